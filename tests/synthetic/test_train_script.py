"""The training script's batching: several questions per encoded image, the chunked unmasked loss
and growing the language model. Run in a subprocess: the script registers bare ``vlmdeploy``
packages so that training never imports the engine, which must not leak into this process."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

CHECK = textwrap.dedent('''
    import copy, json
    from pathlib import Path
    import torch
    import torch.nn.functional as F
    import tools.training as t  # first: it keeps the vlmdeploy imports below off the engine
    from transformers import AutoTokenizer
    from vlmdeploy.synthetic.reference import build_hf_model

    model_dir = Path("vlmdeploy/assets/internvl3_5-shapes-tiny")
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    cfg = json.loads((model_dir / "config.json").read_text())
    img = tok.convert_tokens_to_ids("<IMG_CONTEXT>")
    model = build_hf_model(cfg, img)
    t.load_original_weights(model, model_dir)
    model.eval()
    data = t.TrainSet(tok, 10, per_scene=3)
    samples = [data[i] for i in range(2)]  # 3 tiles and 1 tile, 3 questions each: 6 sequences
    batch = t.collate(samples, tok.pad_token_id)
    # every sequence of a sample shows that sample's tiles, 256 tokens each
    assert len(batch["ids"]) == sum(len(s["ids"]) for s in samples) > len(samples)
    per_seq = (batch["ids"] == img).sum(1)
    row = 0
    for s in samples:
        for _ in s["ids"]:
            assert int(per_seq[row]) == 256 * len(s["pixels"]), (row, int(per_seq[row]))
            row += 1
    heads = t.AuxHeads(cfg["llm_config"]["hidden_size"], True)
    with torch.no_grad():
        chunked, *_ = t.loss_of(model, heads, batch, torch.float32, 0.0, chunks=3)
        feats = t.image_features(model, t.normalise(batch["pixels"], torch.float32))
        emb = model.get_input_embeddings()(batch["ids"])
        emb = emb.masked_scatter((batch["ids"] == img).unsqueeze(-1), feats[batch["tiles"]])
        logits = model(inputs_embeds=emb, attention_mask=batch["mask"]).logits[:, :-1]
        masked = F.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                 batch["labels"][:, 1:].reshape(-1), ignore_index=-100)
        deeper = copy.deepcopy(cfg)
        deeper["llm_config"]["num_hidden_layers"] += 2
        grown = build_hf_model(deeper, img)
        t.load_original_weights(grown, model_dir)
        grown.eval()
        grown_loss, *_ = t.loss_of(grown, heads, batch, torch.float32, 0.0)
    end = tok.convert_tokens_to_ids("</img>")
    with_ends = t.collate(samples, tok.pad_token_id, end)
    marked = with_ends["ends"][..., 0] != -100
    assert torch.equal(marked, with_ends["ids"] == end)  # every </img>, and nothing else
    first = int((with_ends["ids"][0] == end).nonzero()[0, 0])
    scene = t.sample_questions(0, 3)[0].scenes[0]
    assert with_ends["ends"][0, first].tolist() == t.scene_slots(scene).tolist()
    summary = t.SummaryHead(cfg["llm_config"]["hidden_size"], 2)
    with torch.no_grad():
        _, _, summary_loss = t.loss_of(model, heads, with_ends, torch.float32, 0.0,
                                       summary=summary)
    assert 0 < float(summary_loss) < 10
    print("LOSSES", float(chunked), float(masked), float(grown_loss))
    assert abs(chunked - masked) < 1e-4 * max(1.0, float(masked))
    assert abs(grown_loss - masked) < 1e-4 * max(1.0, float(masked))
''')


def test_training_batches_match_the_plain_padded_loss_and_growth_keeps_the_model():
    proc = subprocess.run([sys.executable, "-c", CHECK], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "LOSSES" in proc.stdout


MIX = textwrap.dedent('''
    import tools.training as t  # first: it keeps the vlmdeploy imports below off the engine
    from vlmdeploy.synthetic.questions import TOTAL_PROMPT
    from vlmdeploy.synthetic.scene import SHAPES

    assert t.parse_kind_weights("multi_turn=0.3, count=0.2") == {"multi_turn": 0.3, "count": 0.2}
    for bad in ("spelling=0.1", "count=-1"):
        try:
            t.parse_kind_weights(bad)
        except ValueError:
            pass
        else:
            raise AssertionError(bad)
    counts = zeros = 0
    for i in range(300):
        plain = t.sample_questions(i, 3)
        assert [(q.kind, q.answer) for q in t.sample_questions(i, 3, 0.0)] == [
            (q.kind, q.answer) for q in plain]  # off by default: the stream is unchanged
        for before, q in zip(plain, t.sample_questions(i, 3, 1.0)):
            if q.kind != "count" or q.messages[0]["content"][-1]["text"] == TOTAL_PROMPT:
                continue
            counts += 1
            shape = q.messages[0]["content"][-1]["text"].split()[2][:-1]  # "How many stars ..."
            scene = q.scenes[0]
            assert q.messages[0]["content"][:-1] == before.messages[0]["content"][:-1]  # same image
            if any(scene.count(s) == 0 for s in SHAPES):
                assert q.answer == "0" and scene.count(shape) == 0, (i, q.messages, q.answer)
                zeros += 1
    assert counts > 20 and zeros > counts // 2
    print("MIX", counts, zeros)
''')


def test_training_mix_flags_weight_kinds_and_ask_about_absent_shapes():
    proc = subprocess.run([sys.executable, "-c", MIX], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "MIX" in proc.stdout
