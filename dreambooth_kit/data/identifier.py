"""Pick a rare identifier: single-token words the base model attaches little meaning to.

The DreamBooth recipe binds the subject to a rare token, so that training does not have to overwrite
what the word already means. Two things make a word a poor choice: it splits into several tokens
(the subject is then spread over pieces that also occur in other words), or the model already
draws something for it ("sks" is a rifle). The first is read from the tokenizer; the second is
measured: how much the base model's prediction changes when the word is put in front of the class
noun (``a photo of <word> dog`` against ``a photo of a dog``), on fixed noisy inputs. A word the
model knows moves the prediction; a rare one barely does.
"""

from __future__ import annotations

from dataclasses import dataclass

from dreambooth_kit.errors import InvalidInput

# Words too common to serve as an identifier: the LoRA would rewrite their meaning everywhere.
COMMON_WORDS = frozenset(
    "a an the of in on at with and or photo picture dog cat man woman person boy girl car house "
    "style art red blue green black white big small new old good one two".split()
)
# Popular identifiers that already mean something, with what: shown, and left out of the search.
KNOWN_MEANINGS = {"sks": "a rifle (SKS carbine): SD draws guns for it"}
# CLIP's BPE numbers its tokens in merge order, most frequent first; in its 49,408-token vocabulary the
# whole-word tokens above 35,000 are rare words, abbreviations and names. Smaller vocabularies (the
# built-in models') are searched whole.
RARE_FROM_ID = 35_000
FULL_VOCAB = 40_000
TIMESTEPS = (200, 500, 800)  # three noise levels: the prompt steers coarse layout and fine detail


@dataclass(frozen=True)
class Candidate:
    word: str
    token_id: int
    change: float  # mean squared change of the base model's prediction (lower: rarer to the model)


def single_token_words(tokenizer, *, min_len: int = 3, max_len: int = 5) -> list[tuple[str, int]]:
    """Whole-word tokens of ``min_len``..``max_len`` ASCII letters that tokenize to themselves alone,
    minus common words and known meanings; for a CLIP-size vocabulary only the rare end."""
    vocab = tokenizer.get_vocab()
    rare_from = RARE_FROM_ID if len(vocab) >= FULL_VOCAB else 0
    words = []
    for token, token_id in vocab.items():
        word = token.removesuffix("</w>")
        if token == word or token_id < rare_from:
            continue
        if not (word.isascii() and word.isalpha() and word.islower() and min_len <= len(word) <= max_len):
            continue
        if word in COMMON_WORDS or word in KNOWN_MEANINGS:
            continue
        if tokenizer.tokenize(word) == [token]:
            words.append((word, token_id))
    return sorted(words, key=lambda w: w[1])


def prediction_change(components, class_noun: str, words: list[str], *, seeds: int = 4) -> list[float]:
    """For each word: the mean squared difference between the UNet's prediction for
    ``a photo of <word> <class>`` and for ``a photo of a <class>`` over ``seeds`` fixed noise inputs
    at :data:`TIMESTEPS`."""
    import torch  # here, not at the top: preflight (check-data) reads this module's word lists

    from dreambooth_kit.training.latent_cache import PromptEncoder

    unet = components.unet
    encode = PromptEncoder(components.tokenizer, components.text_encoder, trained=False, device="cpu")
    size = unet.config.sample_size
    g = torch.Generator().manual_seed(0)
    x = torch.randn(seeds * len(TIMESTEPS), unet.config.in_channels, size, size, generator=g)
    t = torch.tensor(TIMESTEPS * seeds)

    def predict(prompt: str) -> torch.Tensor:
        return unet(x, t, encode([prompt]).expand(x.shape[0], -1, -1), return_dict=False)[0]

    from tqdm.auto import tqdm

    with torch.no_grad():
        base = predict(f"a photo of a {class_noun}")
        return [
            float(((predict(f"a photo of {w} {class_noun}") - base) ** 2).mean())
            for w in tqdm(words, desc="identifier candidates", unit="word")
        ]


def find_identifiers(
    model, class_noun: str, *, n: int = 10, pool: int = 200, seeds: int = 4
) -> list[Candidate]:
    """The ``n`` candidates whose addition changes the base model's prediction least. ``model``: a
    ``ModelConfig`` or ``ModelSource``; ``pool``: how many single-token words are measured (spread
    evenly over the rare end, so the search costs ``pool`` x ``seeds`` x 3 UNet evaluations)."""
    from dreambooth_kit.models.source import load_components

    components = load_components(model)
    words = [w for w in single_token_words(components.tokenizer) if w[0] != class_noun.lower()]
    if not words:
        raise InvalidInput(
            f"the tokenizer of {getattr(model, 'pretrained', model)} has no single-token word of 3-5 letters "
            "that is not common; give another --model, or choose an identifier by hand and let "
            "check-data check it"
        )
    if len(words) > pool:
        step = len(words) / pool
        words = [words[int(i * step)] for i in range(pool)]
    changes = prediction_change(components, class_noun, [w for w, _ in words], seeds=seeds)
    ranked = sorted(
        (Candidate(w, i, c) for (w, i), c in zip(words, changes, strict=True)),
        key=lambda c: (c.change, c.word),
    )
    return ranked[:n]
