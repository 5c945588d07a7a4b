"""adapter.pivotal: the identifier's own token embedding trained together with the adapter (pivotal
tuning, as the diffusers advanced DreamBooth script and OneTrainer do it).

The identifier (``zwx``) keeps its tokens; what trains is one vector per token, starting from the
tokenizer's own embedding of them (so step 0 is the plain LoRA run), put in place of those tokens'
embeddings wherever the token sequence appears in a prompt. The text encoder itself stays frozen.
The vectors are written as an A1111/ComfyUI textual-inversion file named after the identifier,
``lora/<identifier>.safetensors`` (``{"emb_params": n x width}``): A1111 swaps the word ``zwx`` of a
prompt for those n vectors when the file is in its ``embeddings`` folder, at the same places as here;
``generate`` applies it from the LoRA folder by itself.

Written by hand, and why: diffusers' ``load_textual_inversion`` adds a *new* token, and refuses one the
tokenizer already has; a good identifier is a rare token the tokenizer already has (``sks``), so the
vectors are placed by a forward hook on the embedding layer instead.
"""

from __future__ import annotations

from pathlib import Path

import torch

from dreambooth_kit.errors import InvalidInput

EMB_KEY = "emb_params"  # A1111's key for an SD 2.x embedding file (ComfyUI and diffusers read it too)
CHECKPOINT_FILE = "pivotal.safetensors"


def token_ids(tokenizer, identifier: str) -> tuple[int, ...]:
    """The identifier's token ids as a prompt spells it (without the start and end tokens)."""
    ids = tokenizer(identifier, add_special_tokens=False).input_ids
    if not ids:
        raise InvalidInput(f"adapter.pivotal: the identifier {identifier!r} has no tokens")
    return tuple(ids)


class Pivots(torch.nn.Module):
    """One vector per token of each identifier, placed into a text encoder's input embeddings by
    :meth:`install`: trainable ones starting from the tokenizer's own embedding (:meth:`start`), or
    trained ones read back for generation (:meth:`trained`)."""

    def __init__(self, tokenizer, vectors: dict[str, torch.Tensor], *, trainable: bool) -> None:
        super().__init__()
        self.identifiers = list(vectors)
        self.ids = {ident: token_ids(tokenizer, ident) for ident in self.identifiers}
        for ident, v in vectors.items():
            if v.shape[0] != len(self.ids[ident]):
                raise InvalidInput(
                    f"adapter.pivotal: the embedding of {ident!r} has {v.shape[0]} vectors, the identifier "
                    f"{len(self.ids[ident])} tokens in this tokenizer; use the base model the LoRA was trained on"
                )
        self.vectors = torch.nn.ParameterList(
            [
                torch.nn.Parameter(v.detach().float().clone(), requires_grad=trainable)
                for v in vectors.values()
            ]
        )

    @classmethod
    def start(cls, tokenizer, text_encoder, identifiers: list[str]) -> Pivots:
        table = text_encoder.get_input_embeddings().weight
        vectors = {i: table[list(token_ids(tokenizer, i))] for i in dict.fromkeys(identifiers)}
        return cls(tokenizer, vectors, trainable=True)

    @classmethod
    def trained(cls, tokenizer, vectors: dict[str, torch.Tensor]) -> Pivots:
        return cls(tokenizer, vectors, trainable=False)

    def install(self, text_encoder) -> torch.utils.hooks.RemovableHandle:
        """Every later forward of ``text_encoder`` uses these vectors for the identifiers' tokens."""
        return text_encoder.get_input_embeddings().register_forward_hook(self._hook)

    def _hook(self, module, inputs, output: torch.Tensor) -> torch.Tensor:
        input_ids = inputs[0]
        for ident, vec in zip(self.identifiers, self.vectors, strict=True):
            output = place(output, input_ids, self.ids[ident], vec.to(output.device))
        return output


def place(
    embeds: torch.Tensor, input_ids: torch.Tensor, ids: tuple[int, ...], vec: torch.Tensor
) -> torch.Tensor:
    """``embeds`` (batch x length x width) with ``vec``'s rows wherever the sequence ``ids`` starts."""
    n = len(ids)
    if input_ids.shape[1] < n:
        return embeds
    windows = input_ids.unfold(1, n, 1)  # batch x (length - n + 1) x n
    starts = (windows == torch.tensor(ids, device=input_ids.device)).all(-1)
    if not starts.any():
        return embeds
    for k in range(n):
        at = torch.zeros_like(input_ids, dtype=torch.bool)
        at[:, k : k + starts.shape[1]] = starts
        embeds = torch.where(at[..., None], vec[k].to(embeds.dtype), embeds)
    return embeds


def checkpoint_tensors(pivots: Pivots) -> dict[str, torch.Tensor]:
    """What a checkpoint holds (``pivotal.safetensors``): each identifier's vectors under its name."""
    return {
        i: v.detach().float().cpu().contiguous()
        for i, v in zip(pivots.identifiers, pivots.vectors, strict=True)
    }


def load_checkpoint_tensors(pivots: Pivots, tensors: dict[str, torch.Tensor]) -> None:
    if set(tensors) != set(pivots.identifiers):
        raise InvalidInput(
            f"the checkpoint's pivotal vectors are for {sorted(tensors)}, this run's identifiers "
            f"{pivots.identifiers}; resume with the identifiers the checkpoint was trained with (data.identifier)"
        )
    with torch.no_grad():
        for ident, vec in zip(pivots.identifiers, pivots.vectors, strict=True):
            vec.copy_(tensors[ident])


def embedding_files(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """``<identifier>.safetensors`` contents in A1111's layout, from :func:`checkpoint_tensors`."""
    return {f"{i}.safetensors": {EMB_KEY: v.detach().float().cpu().contiguous()} for i, v in tensors.items()}


def identifiers_of(config: dict) -> list[str]:
    """The identifiers of a run's config (as saved beside its LoRA): data.identifier or each concept's."""
    concepts = config.get("concepts") or []
    found = (
        [c.get("identifier") for c in concepts]
        if concepts
        else [(config.get("data") or {}).get("identifier")]
    )
    return [i for i in found if i]


def apply_vectors(pipe, vectors: dict[str, torch.Tensor]) -> None:
    """Put trained vectors ({identifier: n x width}) into ``pipe``'s text encoder."""
    Pivots.trained(pipe.tokenizer, vectors).install(pipe.text_encoder)


def apply_from_folder(pipe, lora_dir: Path, config: dict) -> list[str]:
    """If the LoRA folder was trained with adapter.pivotal, put its identifiers' vectors into ``pipe``'s
    text encoder; returns the identifiers applied."""
    from safetensors.torch import load_file

    vectors = {}
    for file in embedding_paths(lora_dir, config):
        if not file.is_file():
            raise InvalidInput(f"{lora_dir}: trained with adapter.pivotal, but {file.name} is missing")
        vectors[file.stem] = load_file(str(file))[EMB_KEY]
    if vectors:
        apply_vectors(pipe, vectors)
    return list(vectors)


def embedding_paths(lora_dir: Path, config: dict) -> list[Path]:
    """The embedding files a pivotal LoRA folder holds (none for any other folder); ``config``: the
    folder's config.yaml as a dict (runfolder.Run.config)."""
    if not (config.get("adapter") or {}).get("pivotal"):
        return []
    return [lora_dir / f"{i}.safetensors" for i in identifiers_of(config)]


def write_into_table(pipe, lora_dir: Path, config: dict) -> None:
    """For a merged model: the vectors written into the text encoder's token table, which is exact
    only when each identifier is one token (a row of its own); a split identifier's rows are shared
    with other words, so that export is refused."""
    from safetensors.torch import load_file

    table = pipe.text_encoder.get_input_embeddings().weight
    for path in embedding_paths(lora_dir, config):
        ids = token_ids(pipe.tokenizer, path.stem)
        if len(ids) != 1:
            raise InvalidInput(
                f"adapter.pivotal: the identifier {path.stem!r} is {len(ids)} tokens, whose rows other words "
                "share; a merged model cannot hold its vectors. Use the LoRA with its embedding file, or an "
                "identifier of one token (dreambooth-kit identifier)"
            )
        with torch.no_grad():
            table[ids[0]] = load_file(str(path))[EMB_KEY][0].to(table.dtype)
