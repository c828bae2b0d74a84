"""A mixed step (decodes and a prefill chunk in one forward) tells the attention op how many
sequences at its head have one new token each, which the GPU uses to send those rows to the decode
kernel. The hint must count exactly the leading one-token sequences, or rows would be lost."""

from __future__ import annotations

from vlmdeploy import GenerationConfig, PytorchEngineConfig, kernels, pipeline


def test_mixed_steps_pass_the_leading_decode_rows(tiny_ckpts, monkeypatch):
    seen = []

    def spy(name: str, cu_at: int):
        real = getattr(kernels, name)

        def op(*args, **hints):
            cu = args[cu_at]
            seen.append(((cu[1:] - cu[:-1]).tolist(), hints.get("num_decode", 0),
                         hints.get("max_q_len")))
            return real(*args, **hints)

        monkeypatch.setattr(kernels, name, op)

    # attention over rotated q (cu_seqlens_q is argument 3), and over raw q/k/v (argument 11),
    # which the Qwen3 layers use
    spy("paged_attention", 3)
    spy("paged_attention_norm_rope", 11)
    cfg = PytorchEngineConfig(session_len=2048, max_prefill_token_num=32, num_gpu_blocks=128)
    with pipeline(tiny_ckpts["hf"], backend_config=cfg) as pipe:
        pipe(["Hi", "A much longer text-only prompt " * 16],
             gen_config=GenerationConfig(max_new_tokens=8, ignore_eos=True))
    mixed = [(lens, nd) for lens, nd, max_q in seen if max_q > 1 and 1 in lens]
    assert mixed, "no mixed step was scheduled"
    for lens, nd in mixed:
        lead = next((i for i, n in enumerate(lens) if n != 1), len(lens))
        assert nd == lead and nd >= 1, (lens, nd)
    for lens, nd, max_q in seen:
        if max_q > 1 and lens[0] != 1:
            assert nd == 0
