"""adapter.pivotal: the identifier's token vectors trained with the LoRA, saved as an A1111/ComfyUI
embedding beside it, and applied by generate."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_cfg
from safetensors.torch import load_file

from dreambooth_kit.training.pivotal import EMB_KEY, place
from dreambooth_kit.training.train import train

PROMPT, CLASS = "a photo of zwx toy", "a photo of a toy"


def test_the_vectors_go_where_the_token_sequence_is_and_nowhere_else():
    embeds = torch.zeros(2, 6, 3)
    ids = torch.tensor([[1, 7, 8, 2, 7, 9], [1, 7, 8, 7, 8, 2]])
    vec = torch.tensor([[1.0, 1, 1], [2.0, 2, 2]])
    out = place(embeds, ids, (7, 8), vec)
    assert out[0, 1].tolist() == [1, 1, 1] and out[0, 2].tolist() == [2, 2, 2]
    assert out[0, 4].abs().sum() == 0  # 7 without 8 after it is not the identifier
    assert out[1, 1:5].tolist() == [[1, 1, 1], [2, 2, 2], [1, 1, 1], [2, 2, 2]]
    assert out[:, [0, 5]].abs().sum() == 0


@pytest.fixture(scope="module")
def pivotal_run(tmp_path_factory, tiny_model):
    from conftest import train_tiny

    tmp = tmp_path_factory.mktemp("pivotal")
    overrides = {"adapter.pivotal": True, "train.max_steps": 3, "train.learning_rate": 1e-2}
    return tmp, overrides, train_tiny(tmp, tiny_model, **overrides)


def _encode(pipe, prompt: str) -> torch.Tensor:
    with torch.no_grad():
        return pipe.encode_prompt(prompt, "cpu", 1, False)[0]


def test_the_embedding_is_saved_and_changes_the_identifiers_encoding_and_nothing_else(
    pivotal_run, tiny_model
):
    from dreambooth_kit.inference.pipeline import load_pipeline

    _, _, result = pivotal_run
    emb = load_file(result.lora_dir / "zwx.safetensors")[EMB_KEY]
    base = load_pipeline(str(tiny_model), dtype="float32")
    ids = base.tokenizer("zwx", add_special_tokens=False).input_ids
    start = base.text_encoder.get_input_embeddings().weight[ids].detach()
    assert emb.shape == start.shape and not torch.allclose(emb, start)  # it trained
    tuned = load_pipeline(str(tiny_model), lora=result.lora_dir, dtype="float32")
    assert not torch.allclose(_encode(tuned, PROMPT), _encode(base, PROMPT))
    assert torch.equal(_encode(tuned, CLASS), _encode(base, CLASS))


def test_a_textual_inversion_loader_reads_the_file_as_our_hook_applies_it(pivotal_run, tiny_model):
    """diffusers' load_textual_inversion (A1111's file layout) under a new token gives the identifier's
    encoding that generate gives: the vectors land where the word was."""
    from diffusers import StableDiffusionPipeline

    from dreambooth_kit.inference.pipeline import load_pipeline

    _, _, result = pivotal_run
    ours = load_pipeline(str(tiny_model), lora=result.lora_dir, dtype="float32")
    plain = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None)
    plain.load_textual_inversion(str(result.lora_dir / "zwx.safetensors"), token="<zwx-emb>")
    torch.testing.assert_close(_encode(plain, "a photo of <zwx-emb> toy"), _encode(ours, PROMPT))


def test_a_resumed_pivotal_run_ends_with_the_uninterrupted_runs_vectors_and_lora(
    pivotal_run, tiny_model, tmp_path
):
    from dreambooth_kit.training.checkpoint_index import list_checkpoints

    tmp, overrides, result = pivotal_run
    short = train(tiny_cfg(tmp_path / "a", tiny_model, tmp / "photos", **{**overrides, "train.max_steps": 2}))
    (step, ckpt), *_ = list_checkpoints(short.output_dir)
    resumed = train(
        tiny_cfg(tmp_path / "b", tiny_model, tmp / "photos", **{**overrides, "train.resume": str(ckpt)})
    )
    for name in ("zwx.safetensors", "pytorch_lora_weights.safetensors"):
        a, b = load_file(result.lora_dir / name), load_file(resumed.lora_dir / name)
        assert step == 2 and all(torch.equal(a[k], b[k]) for k in a), name


@pytest.mark.parametrize(
    "overrides, expect",
    [
        ({"data.identifier": None}, "adapter.pivotal: data.identifier is not set"),
        ({"adapter.type": "full"}, "adapter.pivotal: a full fine-tune trains no adapter to pivot on"),
    ],
)
def test_pivotal_without_an_identifier_or_an_adapter_is_refused(overrides, expect):
    from dreambooth_kit.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=expect):
        load_config("tiny.yaml", {"adapter.pivotal": True, **overrides})


def test_exports_carry_the_vectors_the_kohya_one_as_a_file_the_merged_one_in_its_token_table(
    pivotal_run, tiny_model, tmp_path
):
    from dreambooth_kit.export.run import run_exports
    from dreambooth_kit.inference.pipeline import load_pipeline

    _, _, result = pivotal_run
    written = run_exports(result.output_dir, ["kohya", "merged-diffusers"], out_dir=tmp_path)
    assert tmp_path / "embeddings" / "zwx.safetensors" in written
    assert load_file(tmp_path / "embeddings" / "zwx.safetensors")[EMB_KEY].shape[0] == 1
    merged = load_pipeline(str(tmp_path / "merged-diffusers"), dtype="float32")
    ours = load_pipeline(str(tiny_model), lora=result.lora_dir, dtype="float32")
    torch.testing.assert_close(_encode(merged, PROMPT), _encode(ours, PROMPT))


def test_ema_keeps_an_average_of_the_vectors_too(tiny_model, tmp_path, photos):
    from dreambooth_kit.training.checkpoint_index import list_checkpoints

    result = train(
        tiny_cfg(tmp_path, tiny_model, photos, **{"adapter.pivotal": True, "train.ema": True, "train.max_steps": 2,
                                                  "train.learning_rate": 1e-2})
    )  # fmt: skip
    raw, avg = (load_file(result.output_dir / d / "zwx.safetensors")[EMB_KEY] for d in ("lora", "lora_ema"))
    assert not torch.equal(raw, avg)
    (_, ckpt), *_ = list_checkpoints(result.output_dir)
    assert (ckpt / "ema" / "pivotal.safetensors").is_file() and (ckpt / "pivotal.safetensors").is_file()


def test_evaluate_scores_a_checkpoint_with_that_steps_vectors(pivotal_run, tiny_model):
    from dreambooth_kit.config import load_config
    from dreambooth_kit.evaluation.evaluate import RunWeights, Target, load_target
    from dreambooth_kit.inference.pipeline import load_pipeline
    from dreambooth_kit.training.checkpoint_index import list_checkpoints
    from dreambooth_kit.training.runfolder import Run

    _, _, result = pivotal_run
    (step, ckpt), *_ = list_checkpoints(result.output_dir)
    cfg = load_config(result.output_dir / "config.yaml")
    run = RunWeights(Run.open(result.output_dir).model_source(), cfg.adapter, cfg.to_dict())
    pipe = load_target(Target(ckpt.name, step, "checkpoint", ckpt), run)
    final = load_pipeline(str(tiny_model), lora=result.lora_dir, dtype="float32")
    torch.testing.assert_close(_encode(pipe, PROMPT), _encode(final, PROMPT))


def test_an_identifier_of_several_tokens_trains_but_has_no_merged_export(tiny_model, tmp_path, photos):
    from dreambooth_kit.errors import InvalidInput
    from dreambooth_kit.export.merged import export_merged_diffusers
    from dreambooth_kit.training.pivotal import token_ids

    result = train(
        tiny_cfg(tmp_path, tiny_model, photos, **{"adapter.pivotal": True, "train.max_steps": 1,
                 "data.instance_prompt": "a photo of zwxtoy toy", "data.identifier": "zwxtoy"})
    )  # fmt: skip
    vectors = load_file(result.lora_dir / "zwxtoy.safetensors")[EMB_KEY]
    from transformers import AutoTokenizer

    assert (
        vectors.shape[0]
        == len(token_ids(AutoTokenizer.from_pretrained(tiny_model, subfolder="tokenizer"), "zwxtoy"))
        > 1
    )
    with pytest.raises(InvalidInput, match=r"is \d tokens, whose rows other words share"):
        export_merged_diffusers(result.output_dir, tmp_path / "merged")


def test_several_processes_are_refused_before_training(tiny_model):
    from types import SimpleNamespace

    from dreambooth_kit.config import load_config
    from dreambooth_kit.errors import UserError
    from dreambooth_kit.training.launch import check_pivotal_launch

    cfg = load_config("tiny.yaml", {"adapter.pivotal": True})
    with pytest.raises(UserError, match="adapter.pivotal trains on one process for now"):
        check_pivotal_launch(cfg, SimpleNamespace(num_processes=2))
    check_pivotal_launch(cfg, SimpleNamespace(num_processes=1))  # one process: fine
