"""Moderation stage 1: a blocklist matched through disguises, and spam rules. Sans-I/O.

**Normalising.** People write around blocklists: ``FUCK``, ``fück``, ``fμck`` (a Greek mu),
``ｆｕｃｋ`` (full width), ``f\u200buck`` (a zero-width space), ``fuuuuck``, ``f u c k``,
``f.u.c.k``, ``sh1t``, ``$h!t``. :func:`fold` undoes what Unicode allows: NFKD (full width
and styled letters become plain ones, accents come apart), then combining marks and format
characters (zero-width spaces, soft hyphens) are dropped, letters that look alike in Greek
and Cyrillic are mapped to Latin ones (:data:`CONFUSABLES`), and everything is lower-cased.
:func:`join_spaced` joins runs of three or more single characters that spacing tricks
split (``f u c k`` -> ``fuck``).

**Matching.** Leetspeak is handled in the pattern rather than in the text, because a digit
stands for different letters in different words (``sh1t``: i, ``s1ut``: l): each letter of a
blocklist word becomes a class of what may stand for it (``i`` -> ``[i1!|]``) and may repeat
(``fuuuck``). An entry is ``word`` (the whole word, or it with a common ending: ``s``, ``es``,
``ed``, ``er``, ``ers``, ``ing``, ``in``), ``word*`` (words starting so), or ``*word*``
(anywhere, even inside another word); several words match as a phrase with any separators.
Letters before and after a whole-word match must not be letters, so ``Scunthorpe`` is not
``cunt*`` and ``Niger`` is not ``nigger*``. An allowlisted word is never matched.

A scan of every comment with that expression would cost ~50 µs, so a cheap exact prefilter
runs first: each character becomes a canonical letter of its leetspeak class (``1``, ``|``,
``!`` and ``l`` all become ``i``), runs of one letter collapse to one, and the words are looked
up in sets built the same way from the entries. Whatever the expression matches, the
prefilter finds (it may find more: ``niger`` collapses like ``nigger``), and only then does the
expression decide. Clean comments, nearly all of them, cost a few microseconds.

**Spam.** :class:`SpamRules` keeps, per (stream, user), the recent comments within a window
on the comments' own timestamps (a replay after a crash decides the same way): the same text
``spam_repeats`` times is spam from that copy on; a comment with more than ``max_links``
links, or a user's link posts past ``link_posts_per_window``, are spam. The moderator reads a
stream from one partition in one process, so this state is complete for the streams it owns.
"""

from __future__ import annotations

import re
import unicodedata
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

__all__ = [
    "CONFUSABLES",
    "Blocklist",
    "RuleHit",
    "SpamRules",
    "count_links",
    "deleet",
    "fold",
    "join_spaced",
    "normalise",
    "skeleton",
]

# Letters of other scripts that look like Latin ones (a small table of Unicode TR39's
# confusables: the ones seen in evasion, which NFKD leaves alone).
CONFUSABLES = str.maketrans({
    "α": "a", "β": "b", "ε": "e", "η": "n", "ι": "i", "κ": "k", "μ": "u", "ν": "v", "ο": "o", "ρ": "p",
    "τ": "t", "υ": "u", "χ": "x", "ς": "s", "ω": "w",
    "а": "a", "в": "b", "е": "e", "к": "k", "м": "m", "н": "h", "о": "o", "р": "p", "с": "c", "т": "t",
    "у": "y", "х": "x", "і": "i", "ј": "j", "ѕ": "s", "ԁ": "d", "ԛ": "q", "ԝ": "w", "ү": "y",
    "ø": "o", "ł": "l", "ı": "i", "đ": "d", "ß": "ss", "æ": "ae", "œ": "oe", "þ": "th",
})

# What may stand for each letter in leetspeak.
LEET: dict[str, str] = {
    "a": "a4@", "b": "b8", "e": "e3€", "g": "g9", "i": "i1!|", "l": "l1|", "o": "o0", "s": "s5$", "t": "t7+",
    "z": "z2",
}
# Characters that are part of a word (letters, digits, leetspeak symbols). "!" is leetspeak
# only inside a word: after one, it is punctuation ("shit!").
_WORD_CHARS = "a-z0-9@$|+€"
_TOKEN = re.compile(f"[{_WORD_CHARS}!]+")
ENDINGS = ("s", "es", "ed", "er", "ers", "ing", "in")
_SPACED = re.compile(rf"(?<![{_WORD_CHARS}!])(?:[{_WORD_CHARS}!][^{_WORD_CHARS}!]{{1,2}}){{2,}}[{_WORD_CHARS}!]"
                     rf"(?![{_WORD_CHARS}!])")
_SEPARATORS = re.compile(f"[^{_WORD_CHARS}!]")
# The prefilter's canonical letters: each leetspeak class becomes one letter ("l" and "i"
# share digits, so they are one); every other non-word character becomes a space.
_CANON = {ord(ch): canon for canon, chars in (("a", "4@"), ("b", "8"), ("e", "3€"), ("g", "9"), ("i", "1!|l"),
                                                 ("o", "0"), ("s", "5$"), ("t", "7+"), ("z", "2")) for ch in chars}
# Combining marks (what NFKD splits off accented letters) and invisible format characters:
# zero-width spaces and joiners, soft hyphen, word joiner, BOM, bidi marks.
_INVISIBLE = re.compile("[\u0300-\u036f\u1ab0-\u1aff\u1dc0-\u1dff\u20d0-\u20ff\ufe20-\ufe2f"
                        "\u00ad\u034f\u061c\u180e\u200b-\u200f\u202a-\u202e\u2060-\u2064\ufeff]")
# A word holding a letter and a leetspeak digit or symbol, the letters of which deleet() spells.
_LEET_WORD = re.compile(r"[a-z0-9@$|+€]*(?:[a-z][0-9@$|+€]|[0-9@$|+€][a-z])[a-z0-9@$|+€]*")
_DELEET = str.maketrans({"0": "o", "1": "i", "3": "e", "4": "a", "5": "s", "7": "t", "8": "b", "9": "g",
                         "@": "a", "$": "s", "!": "i", "|": "i", "+": "t", "€": "e"})
_LEET_CHARS = frozenset("0123456789@$|+€")
TOKEN_MEMO = 100_000  # words whose prefilter verdict is remembered
_RUNS = re.compile(r"(.)\1+")
_NON_WORD = re.compile(f"[^{_WORD_CHARS}!]+")
_LINK = re.compile(r"(?:https?://|www\.)\S+|\b[a-z0-9-]+\.(?:com|net|org|io|gg|ru|xyz|tv|ly|me|co|info|biz)\b")


def fold(text: str) -> str:
    """Case, accents, styled and look-alike letters and invisible characters undone."""
    if text.isascii():
        return text.lower()
    kept = _INVISIBLE.sub("", unicodedata.normalize("NFKD", text))
    return kept.lower().translate(CONFUSABLES)


def join_spaced(folded: str) -> str:
    """Join runs of 3+ single characters split by one or two separators: ``f u c k`` -> ``fuck``."""
    return _SPACED.sub(lambda m: _SEPARATORS.sub("", m.group(0)), folded)


def normalise(text: str) -> str:
    """What the blocklist is matched against (and what the model also reads): folded and joined."""
    return join_spaced(fold(text))


def deleet(normalised: str) -> str:
    """Leetspeak spelt out in words that mix letters with digits or symbols (``y0u 1di0t`` ->
    ``you idiot``), for the model, which learnt plain spellings; numbers stay numbers."""
    if _LEET_CHARS.isdisjoint(normalised):  # most comments: no scan
        return normalised
    return _LEET_WORD.sub(lambda m: m.group(0).translate(_DELEET), normalised)


def _letter(ch: str) -> str:
    """The pattern of one blocklist letter: its leetspeak class, repeatable."""
    chars = LEET.get(ch)
    if chars is None:
        return re.escape(ch) + "+"
    return "[" + re.escape(chars) + "]+"


def _entry_pattern(entry: str) -> str:
    """The regular expression of one blocklist entry (see the module docstring)."""
    word = fold(entry.strip())
    anywhere = word.startswith("*")
    prefix = word.endswith("*")
    parts = [p for p in word.strip("*").split() if p]
    body = rf"[^{_WORD_CHARS}]*".join("".join(_letter(ch) for ch in part if ch.isalnum()) for part in parts)
    if anywhere:
        return body
    before = f"(?<![{_WORD_CHARS}])"
    if prefix:
        return before + body
    endings = "|".join("".join(_letter(ch) for ch in e) for e in ENDINGS)
    return f"{before}{body}(?:{endings})?(?![{_WORD_CHARS}])"


@dataclass(frozen=True, slots=True)
class RuleHit:
    """Why stage 1 flagged a comment: the rule and what matched."""

    rule: str  # "blocklist" or "spam"
    reason: str


def skeleton(text: str) -> str:
    """The prefilter's form: canonical letters, separators as single spaces, runs collapsed."""
    return _RUNS.sub(r"\1", _NON_WORD.sub(" ", text).translate(_CANON))


class Blocklist:
    """Every entry in one regular expression behind a prefilter, matched against :func:`normalise` d text."""

    def __init__(self, entries: Iterable[str], allow: Iterable[str] = ()) -> None:
        self.entries = tuple(e for e in entries if e.strip("* "))
        self.allow = frozenset(fold(w.strip()) for w in allow if w.strip())
        patterns = [f"(?P<e{i}>{_entry_pattern(e)})" for i, e in enumerate(self.entries)]
        self._regex = re.compile("|".join(patterns)) if patterns else None
        self._words: set[str] = set()  # skeletons of whole words with their endings
        self._prefixes: dict[str, list[str]] = {}  # first 2 letters -> skeletons of word starts
        self._anywhere: list[str] = []  # skeletons to find anywhere in a word
        self._phrases: list[list[str]] = []  # skeletons of each word of a phrase
        self._tokens: dict[str, tuple[str, bool]] = {}
        for entry in self.entries:
            self._index(fold(entry.strip()))

    def _index(self, entry: str) -> None:
        words = entry.strip("*").split()
        if len(words) > 1:
            self._phrases.append([skeleton(w).strip() for w in words])
        elif entry.startswith("*"):
            self._anywhere.append(skeleton(words[0]).strip())
        elif entry.endswith("*"):
            start = skeleton(words[0]).strip()
            self._prefixes.setdefault(start[:2], []).append(start)
        else:
            self._words.update(skeleton(words[0] + ending).strip() for ending in ("", *ENDINGS))

    def _token(self, token: str) -> tuple[str, bool]:
        """A word's collapsed skeleton and whether it may hold a single-word entry (memoised:
        chat reuses few words, so most words cost one dict lookup)."""
        known = self._tokens.get(token)
        if known is not None:
            return known
        parts = [token] if "!" not in token else [token, *token.split("!")]  # "!": a leetspeak i, or punctuation
        hit = False
        for part in parts:
            for word in skeleton(part).split():
                if word in self._words or any(a in word for a in self._anywhere) \
                        or any(word.startswith(p) for p in self._prefixes.get(word[:2], ())):
                    hit = True
        known = (skeleton(token).replace(" ", ""), hit)
        if len(self._tokens) >= TOKEN_MEMO:
            self._tokens.clear()
        self._tokens[token] = known
        return known

    def _candidate(self, normalised: str) -> bool:
        """The prefilter: False only if the expression cannot match."""
        memo = self._tokens
        letters = []
        for token in _TOKEN.findall(normalised):
            known = memo.get(token) or self._token(token)
            if known[1]:
                return True
            letters.append(known[0])
        if self._phrases:
            # Each word of a phrase shows in the text's letters with the separators taken out
            # (a run across two words collapses to a letter both words keep).
            joined = "".join(letters)
            return any(all(part in joined for part in phrase) for phrase in self._phrases)
        return False

    def match(self, normalised: str) -> str | None:
        """The first blocklist entry found in ``normalised`` text (not inside an allowed word), or None."""
        if self._regex is None or not self._candidate(normalised):
            return None
        for m in self._regex.finditer(normalised):
            if self.allow and self._allowed(normalised, m.start(), m.end()):
                continue
            return self.entries[int(str(m.lastgroup)[1:])]
        return None

    def _allowed(self, text: str, start: int, end: int) -> bool:
        """Is the word around text[start:end] on the allowlist?"""
        for token in _TOKEN.finditer(text):
            if token.start() <= start and end <= token.end():
                return token.group(0) in self.allow
        return False

    def check(self, text: str) -> RuleHit | None:
        entry = self.match(normalise(text))
        return RuleHit("blocklist", f"blocklist: {entry.strip('*')}") if entry is not None else None


def count_links(folded: str) -> int:
    if "." not in folded:  # every link pattern has a dot: most comments need no scan
        return 0
    return len(_LINK.findall(folded))


@dataclass(slots=True)
class _Recent:
    """One user's recent comments on one stream: (ts ms, text) and the times of link posts."""

    texts: deque[tuple[int, str]]
    links: deque[int]


class SpamRules:
    """Repeated messages and link floods, per (stream, user), over the comments' own clock."""

    def __init__(self, repeats: int = 3, window_s: float = 30.0, max_links: int = 2,
                 link_posts_per_window: int = 3, max_users: int = 100_000) -> None:
        self.repeats = repeats
        self.window_ms = int(window_s * 1000)
        self.max_links = max_links
        self.link_posts = link_posts_per_window
        self.max_users = max_users
        self._users: dict[tuple[str, str], _Recent] = {}

    def __len__(self) -> int:
        return len(self._users)

    def check(self, stream: str, user: str, ts: int, folded: str) -> RuleHit | None:
        """Note the comment and say whether it is spam."""
        key = (stream, user)
        recent = self._users.pop(key, None) or _Recent(deque(), deque())
        self._users[key] = recent  # most recently seen last: the oldest go first past max_users
        while len(self._users) > self.max_users:
            del self._users[next(iter(self._users))]
        horizon = ts - self.window_ms
        while recent.texts and recent.texts[0][0] < horizon:
            recent.texts.popleft()
        while recent.links and recent.links[0] < horizon:
            recent.links.popleft()
        text = " ".join(folded.split())
        same = sum(1 for _, t in recent.texts if t == text)
        recent.texts.append((ts, text))
        if self.repeats and same + 1 >= self.repeats:
            return RuleHit("spam", f"spam: the same message {same + 1} times in {self.window_ms // 1000} s")
        links = count_links(folded)
        if links:
            recent.links.append(ts)
            if links > self.max_links:
                return RuleHit("spam", f"spam: {links} links in one comment")
            if self.link_posts and len(recent.links) > self.link_posts:
                return RuleHit("spam", f"spam: {len(recent.links)} comments with links in {self.window_ms // 1000} s")
        return None


def check_all(blocklist: Blocklist, spam: SpamRules | None,
              comments: Sequence[tuple[str, str, int, str]]) -> list[tuple[str, RuleHit | None]]:
    """Stage 1 over a batch of (stream, user, ts, text): per comment its normalised text and hit."""
    out: list[tuple[str, RuleHit | None]] = []
    for stream, user, ts, text in comments:
        folded = fold(text)
        norm = join_spaced(folded)
        entry = blocklist.match(norm)
        hit = RuleHit("blocklist", f"blocklist: {entry.strip('*')}") if entry is not None else None
        if spam is not None:
            spam_hit = spam.check(stream, user, ts, folded)
            hit = hit or spam_hit
        out.append((norm, hit))
    return out
