"""The interpreter's GIL switch interval is lowered while an engine loop runs (its own module: no
other pipeline may be open) and restored once the last loop has stopped."""

from __future__ import annotations

import sys

from vlmdeploy import GenerationConfig, PytorchEngineConfig, pipeline
from vlmdeploy.engine.engine_loop import SWITCH_INTERVAL


def test_the_switch_interval_is_lowered_while_engines_run(tiny_ckpts):
    saved = sys.getswitchinterval()
    sys.setswitchinterval(0.005)
    try:
        cfg = PytorchEngineConfig(session_len=600)
        with pipeline(tiny_ckpts["original"], cfg) as a:
            assert sys.getswitchinterval() == SWITCH_INTERVAL < 0.005
            with pipeline(tiny_ckpts["original"], cfg) as b:
                b("hi", gen_config=GenerationConfig(max_new_tokens=2))
            assert sys.getswitchinterval() == SWITCH_INTERVAL  # a still runs
            a("hi", gen_config=GenerationConfig(max_new_tokens=2))
        assert sys.getswitchinterval() == 0.005
    finally:
        sys.setswitchinterval(saved)
