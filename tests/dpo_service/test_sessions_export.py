"""Export of a session's adapter (issue 12): ``GET /v1/sessions/{id}/adapter`` through
``dpo-service export-adapter`` gives PEFT's own format, and ``PeftModel.from_pretrained`` on the
same Hugging Face base reproduces the service's log-probs."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import httpx
import pytest
import torch

pytest.importorskip("transformers")

from conftest import API_KEY, running_server
from dpo_service.cli import main
from dpo_service.client.adapter_export import unpack_adapter
from test_hf_model import _save_tiny_llama

ADMIN = {"Authorization": f"Bearer {API_KEY}"}
PAIRS = [
    {"prompt_ids": [1, 4, 5, 6], "chosen_ids": [7, 8, 9, 2], "rejected_ids": [11, 12, 2]},
    {"prompt_ids": [1, 20, 21], "chosen_ids": [15, 16, 2], "rejected_ids": [30, 2]},
]


def _peft_logps(model: torch.nn.Module, prompt: list[int], response: list[int]) -> float:
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()
    logps = torch.log_softmax(logits[0, :-1], dim=-1)
    targets = ids[0, 1:]
    picked = logps.gather(1, targets[:, None])[:, 0]
    return float(picked[len(prompt) - 1 :].sum())


@pytest.mark.slow
def test_exported_adapter_loads_in_peft_and_reproduces_the_service(tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    base_dir = tmp_path / "tiny-llama"
    _save_tiny_llama(base_dir)
    with (
        running_server(model=f"hf:{base_dir}", dtype="float32") as srv,
        httpx.Client(base_url=srv.http_url, timeout=60) as http,
    ):
        created = http.post("/v1/sessions", headers=ADMIN, json={
            "lora": {"rank": 4, "alpha": 8.0, "seed": 3}, "optimizer": {"lr": 5e-2}})  # fmt: skip
        assert created.status_code == 201, created.text
        sid, key = created.json()["session"]["id"], created.json()["key"]
        auth = {"Authorization": f"Bearer {key}"}
        for i in range(2):
            r = http.post("/dpo/loss", headers=auth, json={
                "pairs": PAIRS, "session": sid, "train": True, "request_id": f"t{i}"})  # fmt: skip
            assert r.status_code == 200, r.text
        served = http.post("/dpo/loss", headers=auth, json={"pairs": PAIRS, "session": sid})
        assert served.status_code == 200
        wrong = http.get(f"/v1/sessions/{sid}/adapter")
        assert wrong.status_code == 401  # no key, no adapter
        raw = http.get(f"/v1/sessions/{sid}/adapter", headers=auth)
        assert raw.headers["content-type"] == "application/x-tar"
        key_file = tmp_path / "key"
        key_file.write_text(key)
        out = tmp_path / "adapter"
        argv = ["export-adapter", "--url", srv.http_url, "--session", sid, "--out", str(out),
                "--api-key-file", str(key_file)]  # fmt: skip
        assert main(argv) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    base = LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    peft_model = PeftModel.from_pretrained(base, str(out)).eval()
    body = served.json()
    for i, pair in enumerate(PAIRS):
        for side in ("chosen", "rejected"):
            want = body[f"{side}_logps"][i]
            got = _peft_logps(peft_model, pair["prompt_ids"], pair[f"{side}_ids"])
            assert got == pytest.approx(want, abs=1e-4), (i, side)
    with peft_model.disable_adapter():  # the trained adapter matters: the base alone differs
        plain = _peft_logps(peft_model, PAIRS[0]["prompt_ids"], PAIRS[0]["chosen_ids"])
    assert abs(plain - body["chosen_logps"][0]) > 1e-3


def test_unpack_refuses_unexpected_members(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name in ("adapter_config.json", "../evil"):
            info = tarfile.TarInfo(name)
            info.size = 2
            tar.addfile(info, io.BytesIO(b"{}"))
    with pytest.raises(ValueError, match="unexpected"):
        unpack_adapter(buffer.getvalue(), tmp_path / "out")
    assert not (tmp_path / "evil").exists()
