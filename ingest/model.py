"""Moderation stage 2: a trained text classifier behind a small interface, run on whole batches.

A model is anything with ``score_batch(texts) -> scores``: one score in [0, 1] per text, how
likely it is offensive, computed for the whole batch at once (vectorising and a matrix
product cost little more for 2,000 texts than for one). ``moderation.model`` chooses it:

- ``profanity-check`` (default): the linear SVM of the ``alt-profanity-check`` package,
  trained on ~200k labelled comments (Wikipedia talk-page and social media comments), a
  TF-IDF vectoriser and calibrated probabilities; its weights ship inside the package, so
  nothing is downloaded at run time. About 7 µs a comment in batches on one core. It comes
  with the ``chorus-live[moderation]`` extra (scikit-learn, scipy and numpy: most of an
  install, which gateways never import); without it the moderator refuses to start, naming
  the extra.
- ``none``: no model; rules and reputation only.
- ``package.module:factory``: a deployment's own model; ``factory()`` returns an object with
  ``score_batch``. It is loaded at start-up and a missing module, factory or method stops the
  moderator with a message naming the config key, never a silent fallback.

The moderator scores the text as written and, where it differs, the text normalised as for
the blocklist (``sh1t`` -> ``shit``, accents and look-alike letters undone), and keeps the
higher score: the classifier learnt plain spellings.

Live chat repeats itself ("gg", "lol", "W", copied lines), so :class:`ScoreCache` scores each
distinct text of a batch once and remembers the scores of recent texts (a model's score
depends on the text alone).
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

from chorus.config import ConfigError

__all__ = ["MODELS", "MODERATION_EXTRA", "ModelUnavailable", "ProfanityCheckModel", "ScoreCache", "ToxicityModel",
           "load_model", "score_texts"]


# The extra that installs the default model (alt-profanity-check: scikit-learn, scipy, numpy);
# gateways do without it.
MODERATION_EXTRA = "chorus-live[moderation]"


class ModelUnavailable(ConfigError):
    """The configured model cannot be loaded: the moderator does not start."""


@runtime_checkable
class ToxicityModel(Protocol):
    name: str

    def score_batch(self, texts: Sequence[str]) -> Sequence[float]:
        """One score in [0, 1] per text: how likely it is offensive."""
        ...


class ProfanityCheckModel:
    """alt-profanity-check's TF-IDF + calibrated linear SVM, with the weights its package ships."""

    name = "profanity-check"

    def __init__(self) -> None:
        try:
            # Importing the module loads the shipped weights (joblib files inside the package).
            from profanity_check import profanity_check as shipped
        except ImportError as exc:
            raise ModelUnavailable(
                "config key moderation.model: 'profanity-check' needs the moderation extra, which is not "
                f"installed here ({exc}): pip install '{MODERATION_EXTRA}' (or set moderation.model = \"none\" "
                "for rules and reputation only)") from None
        self._vectorizer: Any = shipped.vectorizer
        self._model: Any = shipped.model
        self.version = getattr(shipped, "__version__", "")

    def score_batch(self, texts: Sequence[str]) -> list[float]:
        if not texts:
            return []
        probabilities = self._model.predict_proba(self._vectorizer.transform(list(texts)))
        return [float(p) for p in probabilities[:, 1]]


# Models known by name; anything else must be "module:factory".
MODELS = {"profanity-check": ProfanityCheckModel}


def load_model(spec: str) -> ToxicityModel | None:
    """The model ``spec`` names (see the module docstring); None for ``none``. Raises
    :class:`ModelUnavailable` naming the config key if it cannot be loaded."""
    spec = spec.strip()
    if spec == "none":
        return None
    known = MODELS.get(spec)
    if known is not None:
        return known()
    module_name, colon, factory_name = spec.partition(":")
    if not colon or not module_name or not factory_name:
        raise ModelUnavailable(f"config key moderation.model: unknown model {spec!r}; use one of "
                               f"{', '.join(sorted(MODELS))}, 'none', or 'package.module:factory'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelUnavailable(f"config key moderation.model: cannot import {module_name!r}: {exc}") from None
    factory = getattr(module, factory_name, None)
    if not callable(factory):
        raise ModelUnavailable(f"config key moderation.model: {module_name!r} has no callable {factory_name!r}")
    model = factory()
    if not callable(getattr(model, "score_batch", None)):
        raise ModelUnavailable(f"config key moderation.model: {spec!r} made an object without score_batch(texts)")
    if not isinstance(getattr(model, "name", None), str):
        model.name = spec
    return model


def score_texts(model: ToxicityModel, texts: Sequence[str], normalised: Sequence[str]) -> list[float]:
    """Per text the higher of the scores of its written and its normalised form (one batch call)."""
    extra = [i for i, (t, n) in enumerate(zip(texts, normalised, strict=True)) if n != t.lower()]
    scores = list(model.score_batch([*texts, *(normalised[i] for i in extra)]))
    if len(scores) != len(texts) + len(extra):
        raise ValueError(f"model {model.name!r} returned {len(scores)} scores for {len(texts) + len(extra)} texts")
    out = scores[: len(texts)]
    for k, i in enumerate(extra):
        out[i] = max(out[i], scores[len(texts) + k])
    return out


class ScoreCache:
    """:func:`score_texts` for a batch, each distinct text once, the newest ``size`` texts' scores kept."""

    def __init__(self, model: ToxicityModel, size: int = 50_000) -> None:
        self.model = model
        self.size = size
        self._scores: dict[str, float] = {}
        self.hits = 0
        self.misses = 0

    def score(self, texts: Sequence[str], normalised: Sequence[str]) -> list[float]:
        todo: dict[str, str] = {}  # distinct texts not cached -> their normalised form
        for text, norm in zip(texts, normalised, strict=True):
            if text not in self._scores:
                todo.setdefault(text, norm)
        self.misses += len(todo)
        self.hits += len(texts) - len(todo)
        if todo:
            fresh = score_texts(self.model, list(todo), list(todo.values()))
            if len(self._scores) + len(todo) > self.size:
                self._scores.clear()  # cheaper than an LRU per text; refills with the chat's current phrases
            self._scores.update(zip(todo, fresh, strict=True))
        return [self._scores[t] for t in texts]
