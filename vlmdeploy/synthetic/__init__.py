"""The synthetic visual task of the embedded default model: scenes, questions, evaluation.

``generate_questions(seed, n)`` gives deterministic questions (images, an OpenAI-style
conversation, the exact expected answer); ``evaluate(answer, questions)`` scores any answerer
``answer(messages) -> str`` with ``exact_match``. ``reference`` holds the transformers-side tools
(checkpoint name conversion, the prompt renderer used for training, a greedy answerer); it imports
transformers only when used.
"""

from vlmdeploy.synthetic.eval import EvalReport, evaluate, min_correct
from vlmdeploy.synthetic.questions import (
    KINDS,
    Question,
    describe,
    exact_match,
    generate_questions,
    make_question,
    to_openai_messages,
)

__all__ = [
    "KINDS",
    "EvalReport",
    "Question",
    "describe",
    "evaluate",
    "exact_match",
    "generate_questions",
    "make_question",
    "min_correct",
    "to_openai_messages",
]
