"""Exact-answer evaluation of any answerer on generated questions.

``evaluate(answer, questions)`` calls ``answer(messages) -> str`` once per question (``messages``
is the question's OpenAI-style conversation, image parts ``{"type": "image", "image": PIL}``) and
scores the reply with ``exact_match``. The answerer can be transformers
(``reference.ReferenceAnswerer``) or the public pipeline, e.g.::

    pipe = pipeline(model_dir)
    gen = GenerationConfig(max_new_tokens=32)
    report = evaluate(lambda messages: pipe(messages, gen_config=gen).text, questions)

(``questions.to_openai_messages`` gives the same conversation with PNG data URLs for HTTP.)
CLI: ``python -m vlmdeploy.synthetic.eval MODEL_DIR --n 300 --backend transformers|pipeline``.

``min_correct(n, p, alpha)`` is the pass bound for a small sample: the fewest correct answers out
of ``n`` that a model with true accuracy ``p`` falls below with probability at most ``alpha``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from vlmdeploy.synthetic.questions import Message, Question, exact_match

Answerer = Callable[[list[Message]], str]


@dataclass
class EvalReport:
    correct: dict[str, int] = field(default_factory=dict)
    total: dict[str, int] = field(default_factory=dict)
    failures: list[tuple[Question, str]] = field(default_factory=list)

    def add(self, question: Question, prediction: str) -> None:
        ok = exact_match(prediction, question.answer)
        self.total[question.kind] = self.total.get(question.kind, 0) + 1
        self.correct[question.kind] = self.correct.get(question.kind, 0) + ok
        if not ok:
            self.failures.append((question, prediction))

    @property
    def n(self) -> int:
        return sum(self.total.values())

    @property
    def n_correct(self) -> int:
        return sum(self.correct.values())

    def accuracy(self, kind: str | None = None) -> float:
        if kind is None:
            return self.n_correct / max(self.n, 1)
        return self.correct.get(kind, 0) / max(self.total.get(kind, 0), 1)

    def summary(self) -> str:
        lines = [f"overall {self.n_correct}/{self.n} = {self.accuracy():.1%}"]
        for kind in sorted(self.total):
            lines.append(f"  {kind:12s} {self.correct[kind]}/{self.total[kind]}"
                         f" = {self.accuracy(kind):.1%}")
        return "\n".join(lines)


def evaluate(answer: Answerer, questions: Sequence[Question]) -> EvalReport:
    report = EvalReport()
    for q in questions:
        report.add(q, answer(q.messages))
    return report


def min_correct(n: int, p: float, alpha: float = 1e-3) -> int:
    """Largest k with P(Binomial(n, p) < k) <= alpha: fewer than k correct rejects accuracy p."""
    cdf, k = 0.0, 0
    while k <= n:
        term = math.comb(n, k) * p**k * (1 - p) ** (n - k)
        if cdf + term > alpha:
            return k
        cdf += term
        k += 1
    return n


def main() -> None:
    """``python -m vlmdeploy.synthetic.eval MODEL_DIR [--n 300] [--seed 1000] [--backend ...]``"""
    import argparse
    import time

    from vlmdeploy.synthetic.questions import generate_questions

    p = argparse.ArgumentParser(description="exact-answer accuracy on generated questions")
    p.add_argument("model_dir")
    p.add_argument("--n", type=int, default=300)
    p.add_argument("--seed", type=int, default=1000, help="1000: the model card's held-out set")
    p.add_argument("--backend", choices=("transformers", "pipeline"), default="transformers")
    args = p.parse_args()
    t0 = time.time()
    report = evaluate(_answerer(args.model_dir, args.backend),
                      generate_questions(args.seed, args.n))
    print(report.summary())
    print(f"{args.n} questions in {time.time() - t0:.0f} s")
    for q, pred in report.failures[:20]:
        print(f"  {q.kind:12s} expected {q.answer!r}, got {pred!r}")


def _answerer(model_dir: str, backend: str) -> Answerer:
    if backend == "transformers":
        from vlmdeploy.synthetic.reference import ReferenceAnswerer

        return ReferenceAnswerer(model_dir)
    from vlmdeploy import GenerationConfig, pipeline

    pipe = pipeline(model_dir)
    gen = GenerationConfig(max_new_tokens=32)  # greedy: LMDeploy's default do_sample=False
    return lambda messages: pipe(messages, gen_config=gen).text


if __name__ == "__main__":
    main()
