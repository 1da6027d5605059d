"""Moderation stage 1b: what a comment is aimed at, read from its words. Sans-I/O.

A bag-of-words model (ingest/model.py) hears "kill", "hate", "shoot" and "hell" and scores
"kill the boss", "I hate mondays" and "shoot the ball!" as offensive as "kill him". Live chat
of sports, gaming and music streams is full of such lines. What separates them is the
target: abuse is aimed at a person (``you``, ``your mom``, ``the streamer is a ...``, ``kill
the ref``); the idioms are aimed at things (``the boss``, ``mondays``, ``the ball``, ``that
track``) or are praise (``you killed it``). :func:`read_context` finds, per comment:

- ``category``: what the words show without the model, or "":

  - ``threat``: harm the speaker promises or wishes the reader (``i will find you``, ``i hope
    you die``, ``i know where you live``, doxing, swatting, incitement to self-harm), unless a
    game's context says it is play (``I'll kill you in the next round``);
  - ``menace``: harm promised to someone else (``someone should shoot the ref``), and
    menacing phrases chat also uses harmlessly (``watch your back``, ``you'll regret this``);
  - ``sexual``: sexual harassment (``send nudes``, ``take your top off``, ``go back to the
    kitchen``);
  - ``scam``: a link or a handle next to money, free items, followers or logins
    (``free vbucks at x.xyz``, ``send eth and double it``, ``sub4sub``);
  - ``insult``: an insult word aimed at a person (second person, ``<person> is a ...``, or an
    insult noun on its own: nobody calls a thing an idiot);
  - ``hostile``: contempt aimed at the reader without an insult word (``nobody likes you``,
    ``shut up``, ``you suck``, ``get a life``).

- ``aimed``: the comment addresses or names a person (``you``, ``u``, ``ur``, ``@name``, the
  streamer, mods, a he/she with a verdict);
- ``idiom``: every word the model is known to over-weigh (:data:`HOT_WORDS`) stands in a
  thing-directed or praising idiom (``kill the boss``, ``hate mondays``, ``that was sick``),
  so the model's score says nothing about this comment.

The moderator (ingest/moderator.py) decides with it: threats, sexual harassment and scams
are deleted on their own; a menace or an insult is deleted only when the model agrees at
``moderation.delete_at``, else flagged; the model's score flags a comment aimed at a person at
``flag_at``, and one that nothing corroborates only at ``model_alone_flag_at``.

The word lists are data, not a model: a deployment in another language, or with other
idioms, replaces :data:`LEXICON` entries or turns ``moderation.context_rules`` off.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from chorus.ingest.rules import deleet, fold, normalise

__all__ = ["CATEGORIES", "HOT_WORDS", "LEXICON", "Context", "chat_words", "read_context"]

CONTEXT_MEMO = 50_000  # texts whose context is remembered (a Context is immutable)

# What each category means to the author of a removed comment (the delete event's reason).
CATEGORIES = {
    "threat": "threat aimed at a person",
    "menace": "threat aimed at a person",
    "sexual": "sexual harassment",
    "scam": "spam or scam link",
    "insult": "insult aimed at a person",
    "hostile": "hostility aimed at a person",
}

# Chat spellings of the words the rules read (after deleet: "y0u" is already "you").
_SPELLINGS = {
    "u": "you", "ya": "you", "yu": "you", "yuo": "you", "ur": "your", "urs": "yours", "youre": "you're",
    "yourself": "yourself", "urself": "yourself", "youself": "yourself", "r": "are", "im": "i'm", "ill": "i'll",
    "iam": "i'm", "ima": "i'm gonna", "imma": "i'm gonna", "gonna": "going to", "wanna": "want to",
    "gotta": "got to", "plz": "please", "pls": "please", "ppl": "people", "yall": "you all", "y'all": "you all",
    "dum": "dumb", "stoopid": "stupid", "stupit": "stupid", "idoit": "idiot", "noodz": "nudes", "nudez": "nudes",
    "noods": "nudes", "boobz": "boobs", "d1e": "die", "ded": "dead",
}

_PERSON_WORDS = ("you", "your", "yours", "you're", "yourself", "you all", "him", "her", "he", "she", "he's", "she's",
                 "streamer", "mods", "mod", "ref", "referee", "keeper", "goalie", "chat", "everyone", "everybody",
                 "this guy", "that guy", "this girl", "that girl", "this dude", "people")

# Each list is alternatives of a regular expression over the chat words (joined by spaces).
LEXICON: dict[str, tuple[str, ...]] = {
    # insult words a person is called; nobody calls a thing these
    "insult_noun": (
        "idiots?", "morons?", "imbeciles?", "cretins?", "dumbass(?:es)?", "losers?", "clowns?", "creeps?",
        "perverts?", "freaks?", "scumbags?", "scum", "lowlifes?", "low life", "parasites?", "jackass(?:es)?",
        "bums?", "donkeys?", "pigs?", "monkeys?", "rats?", "snakes?", "virgins?", "incels?", "frauds?",
        "liars?", "thie(?:f|ves)", "scammers?", "nerds?", "noobs?", "bots?", "talentless hacks?", "disgrace",
        "embarrassment", "failures?", "attention seekers?", "waste of (?:space|oxygen|air|time)",
        "piece of (?:garbage|trash|crap)", "basement dwellers?", "no life",
    ),
    # insult nouns never said of a thing or a result, wherever they stand
    "strong_noun": (
        "idiots?", "morons?", "imbeciles?", "cretins?", "dumbass(?:es)?", "jackass(?:es)?", "scumbags?",
        "lowlifes?", "losers?(?! (?:bracket|final|round|side|match|of|goes|'s))", "braindead \\w+", "incels?",
    ),
    # who an insulting adjective may be said of
    "person_noun": (
        "player", "players", "streamer", "singer", "gamer", "guy", "girl", "kid", "dude", "man", "woman", "human",
        "person", "people", "team", "fan", "fans", "mods", "mod", "ref", "referee", "keeper", "clown",
    ),
    # insulting adjectives: an insult only when a person is their subject (an "ugly goal" is fine)
    "insult_adjective": (
        "stupid", "dumb", "dumbest", "brain ?dead", "brainless", "pathetic", "worthless", "useless", "ugly",
        "fat", "disgusting", "gross", "vile", "talentless", "no talent", "trash", "garbage", "a joke",
        "mentally slow", "retarded", "pathetic", "braindead", "clueless idiot", "corrupt", "hopeless", "ashamed",
    ),
    # harm done to a body; "beat", "destroy", "find" and "end" are also what players promise
    # each other in a game, so they are threats only in the fixed phrases below
    "harm_verb": (
        "kill", "murder", "hurt", "stab", "shoot", "punch", "strangle", "choke", "slap", "burn", "dox", "doxx",
        "swat", "rape",
    ),
    # harm with its object in it
    "harm_phrase": (
        "smash (?:your|his|her) face in", "break (?:your|his|her) (?:legs?|neck|arms?|face|bones|teeth)",
    ),
    "wished": (
        "die(?! on| for| laughing| of| hard)", "dies", "get cancer", "crash(?: your car| and burn| and die)?(?! \\w)",
        "get hurt", "burns?(?: down)?", "suffer", "rot",
        "break (?:your|a) (?:leg|neck|arm)", "lose everything", "cry", "get hit", "drown", "beats? you",
        "hurts? you", "kills? you",
    ),
    "sexual": (
        "send (?:me |us )?(?:nudes|pics|nude pics|feet pics)", "nudes",
        "(?:get|be|go|you|you're|your|better|look) naked",
        "naked (?:pics|photos|body|on stream)", "strip for (?:me|us|the chat)", "strip (?:on stream|naked)",
        "boobs", "tits",
        "take (?:your |ur )(?:top |shirt |clothes |bra |pants )?off",
        "take off (?:your|ur) (?:top|shirt|clothes|bra|pants)",
        "take (?:it|that|them|everything) off for (?:me|us|the chat)",
        "show (?:us |me )?(?:your |ur |some |more )(?:body|boobs|feet|skin|chest|ass)", "feet pics",
        "sit on my face", "what are you wearing", "wearing anything under", "touch you", "lick you",
        "in my bed", "hotel room", "bend over", "piece of meat", "because of your body", "back to the kitchen",
        "make (?:me |us )?a sandwich", "(?:women|girls) (?:can'?t|cannot|shouldn'?t|should not) (?:be allowed to )?"
        "(?:play|game|stream)", "sexy", "horny", "without (?:your |ur |any )?clothes",
        "under (?:your|ur) (?:shirt|skirt|top|clothes|dress)",
        "you're so hot", "do things to you", "(?:send|dm) me (?:your |ur )?pics",
    ),
    "scam_word": (
        "free", "giveaway", "win", "prize", "claim", "cheap", "buy", "earn", "bitcoin", "btc", "eth", "crypto",
        "robux", "v ?bucks", "vbux", "nitro", "skins?", "followers", "viewers", "verify", "login", "singles",
        "double", "money", "iphone", "gift",
    ),
    # money for nothing: a scam with or without a link
    "scam_phrase": (
        "dm me for (?:free|money|cash|a prize|crypto|followers|a deal|\\d)", "make \\d+ a day",
        "send (?:\\d|eth|btc|bitcoin|crypto)", "double (?:it|your)", "hot singles",
        "make money (?:fast|quick|quickly|online|from home)",
    ),
    # self-promotion: a scam next to a link or a scam word (alone, the spam rules judge repeats)
    "promotion": (
        "sub ?4 ?sub", "follow (?:me|my channel) (?:at|on)", "check (?:out )?my channel",
        "visit my (?:site|page|channel)", "sub to my channel",
    ),
    "hostile": (
        "shut up(?! and take)", "shut (?:your|ur) (?:mouth|face)", "stfu", "gtfo",
        "nobody (?:likes|wants|cares about|asked)",
        "everyone hates", "no one (?:likes|cares)", "you suck", "suck at", "cry more", "get a life", "get a job",
        "go outside", "quit streaming", "give up", "uninstall", "you don't belong", "go back to where",
        "people like you", "leave", "get banned", "ruin everything", "you sound like (?:a|an) (?!angel)\\w+",
        "insult to",
        "you only got", "fake fan", "should (?:quit|leave|stop)", "you smell", "take a shower", "iq of",
        "ashamed of you", "aborted you", "worst \\w+ (?:alive|ever|in the world|i've ever seen)",
    ),
}

# Words the shipped model over-weighs in chat, and the idioms in which they are harmless.
HOT_WORDS = ("kill", "killed", "killing", "killer", "kills", "hate", "shoot", "shot", "hell", "sick", "insane",
             "destroy", "destroyed", "murder", "murdered", "die", "dying", "dead", "ugly", "stupid", "dumb",
             "suck", "sucks", "crazy", "brutal", "nasty", "disgusting", "filthy", "dirty", "savage", "trash",
             "garbage", "damn", "crap", "beast", "monster", "choke", "choking", "bomb", "bombed", "fire", "wtf")
_THINGS = ("the boss", "boss", "bosses", "zombies", "the zombies", "the tower", "tower", "mondays", "monday",
           "tuesdays", "the ball", "it", "that", "this", "the game", "game", "the map", "map", "level", "levels",
           "track", "song", "beat", "set", "note", "solo", "drop", "run", "round", "fight", "the final circle",
           "campers", "matchmaking", "penalties", "ads", "the layout", "rainy days", "spiders", "the timer")
_IDIOMS = (
    r"(?:kill|killed|killing|destroy|destroyed|murder|murdered|smash|smashed|crush|crushed) (?:the |that |this |"
    r"a |my |our |his |her |their )?(?:boss|bosses|zombies?|tower|track|song|set|solo|beat|note|run|round|level"
    r"|game|it|stage|show|performance|dance|verse|chorus|drop|mix|cover|high note|battery|vibe|time)",
    r"(?:hate|hates|hated) (?:mondays?|tuesdays?|\w+days|when|how|that|this (?:map|boss|part|level|matchmaking|"
    r"weather|song)|the (?:new|final|ads|layout|weather)|losing|spiders|water levels|escort|penalties|"
    r"playing|waking|rainy|these|it)",
    r"i hate this ref", r"hate this (?:\w+ )?(?:map|boss|level|part|game|patch|weather|kit|song|fight)",
    r"shoot(?:s|ing)? (?:the ball|it|from|first|your shot|the zombies|them in the head|on sight)?",
    r"(?:take|took) the shot", r"\bshot\b", r"(?:what|hell) (?:a|of a)", r"hell (?:yeah|yes|no)", r"what the hell",
    r"(?:that|this|so|was|is|sounds|looks) (?:\w+ )?(?:sick|insane|crazy|brutal|nasty|filthy|disgusting|savage|fire)",
    r"(?:sick|insane|nasty|filthy|dirty|savage|brutal|killer) (?:beat|goal|move|play|shot|save|skill|track|drop"
    r"|instinct|drums|clutch|reaction|mix|finish|nutmeg|crossover|finisher|bass|difficulty)",
    r"i'm (?:dead|dying)", r"killing (?:me|it)", r"(?:you|he|she|they|we) (?:killed|smashed|crushed|destroyed|ate|"
    r"murdered) (?:it|that|them|the)", r"on fire", r"(?:ugly|stupid|dumb) (?:goal|win|luck|good|fast|car|skins|"
    r"graphics)", r"(?:game|defence|wifi|quality|stream) is (?:trash|garbage)", r"die (?:on|for) ",
    r"(?:kill|kills|killed|killer) (?:count|steal|feed|streak|spree|cam|shot|on the wing|move|goal)",
    r"(?:double|triple|quadra|penta|first) (?:kill|blood)", r"go for the kill", r"(?:a|the|nice|clean) kill",
    r"(?:sick|insane|cracked|nasty|crazy|filthy|cold) at (?:this|the|it|that)",
    r"choking", r"choke (?:this|it)", r"bombed (?:it|my)", r"beast", r"monster",
    # a game's promises: "I'll kill you in the next round", "gonna destroy you in the rematch"
    r"(?:kill|killed|destroy|destroyed|murder|wreck|crush|end|beat|smoke)(?:s|ed|ing)? (?:you|him|her|them|us|me)"
    r" (?:in|at|on|next|this) (?:the |a |our )?(?:next )?(?:round|game|match|rematch|ranked|1v1|lobby|scrim|final"
    r"|finals|level|map|duel|season|fight|raid|arena|time|tournament)",
)


@dataclass(frozen=True, slots=True)
class Context:
    category: str  # one of CATEGORIES, or ""
    aimed: bool  # addresses or names a person
    idiom: bool  # the model's hot words are all in harmless idioms

    @property
    def reason(self) -> str:
        return CATEGORIES.get(self.category, "")


def _any(words: tuple[str, ...]) -> str:
    return "(?:" + "|".join(words) + ")"


_WORD = re.compile(r"[a-z0-9']+|@\w+")
_PERSON = _any(_PERSON_WORDS)
_PERSON_NOUN = _any(LEXICON["person_noun"])
# "stupid good", "fat fingered": the adjective praises, or is no adjective at all
_ADJECTIVE = _any(LEXICON["insult_adjective"]) + (r"(?! (?:good|fast|quick|strong|talented|smart|cracked|lucky|"
                                                  r"rich|hard|easy|clean|nice|well|finger))(?!-? ?finger)")
_NOUN = _any(LEXICON["insult_noun"])
_SECOND = re.compile(r"(?:^| )(?:you|your|yours|you're|yourself|you all|@\w+)(?= |$)")
# Imperatives said to a person, and words that name one
_ADDRESSED = re.compile(rf"(?:^| )(?:shut up|stfu|gtfo|get out|get a life|get a job|get banned|go cry|{_PERSON}|"
                        rf"{_PERSON_NOUN})(?= |$)")
_INSULT_NOUN = re.compile(rf"(?:^| ){_NOUN}(?= |$)")
_STRONG_NOUN = re.compile(rf"(?:^| ){_any(LEXICON['strong_noun'])}(?= |$)")
_SUBJECT = rf"(?:{_PERSON}|(?:this|that|the|your|these|those) (?:\w+ )?{_PERSON_NOUN}|number \d+)"
_PERSON_IS = re.compile(
    rf"(?:^| ){_SUBJECT} (?:is|are|'s|was|were|so|looks?|sounds?) (?:\w+ ){{0,3}}(?:{_ADJECTIVE}|{_NOUN})(?= |$)")
_ADJECTIVE_PERSON = re.compile(rf"(?:^| ){_ADJECTIVE} (?:\w+ )?(?:{_PERSON_NOUN}|{_NOUN})(?= |$)")
_YOU_ADJ = re.compile(rf"(?:^| )(?:you're|you are|you|your|are you|you look|you sound|how are you|"
                      rf"imagine being)(?: \w+){{0,3}} (?:{_ADJECTIVE}|{_NOUN})(?= |$)")
_BARE_INSULT = re.compile(rf"^(?:hey |what a |what an |you |such a |such an |you absolute |absolute |total |"
                          rf"look at this |look at that )?(?:{_ADJECTIVE} )?{_NOUN}"
                          rf"(?: (?:streamer|player|lol|lmao|haha|behaviour|behavior))?$")
_MODAL = (r"(?: (?:will|would|should|could|can|must|going to|want to|am going to|need to|got to|really|just|"
          r"literally|actually|definitely|come and|gonna|go and|to))*")
_YOU = r"(?:you|your|yourself|your family|you and your family)"
_THIRD = r"(?:him|her|the ref|the referee|the streamer|this guy|that guy|this clown|his family|her family)"
_SPEAKER = (r"(?:^| )(?:i|i'll|i'm|i'd|we|we'll|we're|someone|somebody|let's|lets|i'll make sure|i want to|"
            r"i'm going to|i'm gonna)")
# Harm the speaker promises the reader: deleted on its own (category "threat")
_THREAT_YOU = re.compile(
    rf"{_SPEAKER}{_MODAL} (?:{_any(LEXICON['harm_verb'])}(?:s|es)? {_YOU}|{_any(LEXICON['harm_phrase'])})(?= |$)"
    rf"|^(?:kill|hurt|stab|shoot|punch|rape) you(?= |$)"
    rf"|(?:^| )(?:i|i'll|i'm|we|we'll){_MODAL} (?:find|end) you$")
# Harm promised to someone else (fans say "if he misses I'll kill him"): a menace, deleted only when
# the model agrees (category "menace")
_THREAT_THIRD = re.compile(rf"{_SPEAKER}{_MODAL} {_any(LEXICON['harm_verb'])}(?:s|es)? {_THIRD}(?= |$)"
                           rf"|^(?:kill|hurt|stab|shoot|punch) {_THIRD}(?= |$)")
# Where a promise of harm is a game's: "I will kill you in the next round", "end you in 1v1"
_IN_GAME = re.compile(r"(?:^| )(?:in|next|this|the|a|our|that|another|every) (?:round|game|match|rematch|ranked|"
                      r"lobby|scrim|tournament|final|finals|level|map|server|pvp|duel|season|league|run|raid|"
                      r"fight|arena|zone)(?= |$)|(?:^| )(?:ingame|1v1|next time|rematch|gg)(?= |$)")
_THREAT_FIXED = re.compile(  # each phrase starts a word: anchored so, most positions fail at once
    r"(?:^| )(?:(?:know|find out|found out) where you (?:live|work|sleep|go to school)(?!,? in my)|"
    r"know your (?:school|address|house|workplace|job)|(?:find|leak|post|got|have) your address|"
    r"(?:i|we)(?: will|'ll| am going to|'m going to|'m gonna| gonna) find you(?: and| after| outside| irl|"
    r"(?= in real life)|$)|find (?:your|his|her) (?:address|house|family)|"
    r"beat (?:you|him|her|this guy|that guy|this clown|that clown) (?:up|until|to death|senseless)|"
    r"jump off (?:a|the) (?:bridge|cliff|building|roof)|drink bleach|unalive (?:yourself|urself)|"
    r"(?:disappear|vanish|stop existing|not exist) forever|nobody would miss you(?= |$)|"
    r"(?:world|everyone) would be better (?:off )?without you|"
    r"(?:dox|doxx|swat)(?:ed|ing)? (?:you|him|her|this guy|this clown|the streamer)(?= |$)|"
    r"get (?:you|him|her) (?:doxx?ed|swatted))")
# Menacing phrases sports and music chat also use harmlessly ("watch your back, the defender is
# coming", "you'll regret missing this set"): a menace, deleted only when the model agrees
_MENACE = re.compile(
    r"(?:^| )(?:watch your back|you(?:'re| are) dead(?= when| if| after| meat|$)|dead meat|won't be safe|"
    r"not safe|isn't safe|meet me outside(?! the)|wait for you outside|regret this|"
    r"(?:you're going to|you will|you'll|going to make you) regret(?! missing| not)|make sure you never|"
    r"coming for you(?= |$)|jump (?:him|her|this guy|that guy) (?:after|outside)|teach this clown|"
    r"deserve to be hurt)")
_WISH = re.compile(rf"(?:hope|wish|should|go|just go|please|deserve to)(?: \w+){{0,5}} "
                   rf"{_any(LEXICON['wished'])}(?= |$)|^(?:die|die already|just die|go die)(?: \w+)?$"
                   rf"|(?:you|your \w+) (?:should|deserve to|will|going to) (?:\w+ )?{_any(LEXICON['wished'])}"
                   rf"(?= |$)")
_SEXUAL = re.compile(rf"(?:^| ){_any(LEXICON['sexual'])}(?= |$)")
_SCAM_WORD = re.compile(rf"(?:^| ){_any(LEXICON['scam_word'])}(?= |$)")
_SCAM_PHRASE = re.compile(rf"(?:^| ){_any(LEXICON['scam_phrase'])}")
_PROMOTION = re.compile(rf"(?:^| ){_any(LEXICON['promotion'])}")
_LINKISH = re.compile(r"(?:https?://|www\.)\S+|\b[a-z0-9-]+\.(?:com|net|org|io|gg|ru|xyz|tv|ly|me|co|info|biz|"
                      r"link|click|top|shop)\b(?:/\S*)?")
_HOSTILE = re.compile(rf"(?:^| ){_any(LEXICON['hostile'])}(?= |$)")
_HOT = re.compile(rf"(?:^| ){_any(HOT_WORDS)}(?= |$)")
_IDIOM = re.compile("|".join(f"(?:{p})" for p in _IDIOMS))
# Joined spacing tricks ("y o u a r e t r a s h" -> "youaretrash"): a second person, then an insult
_JOINED_WORDS = tuple(w.replace(" ", "") for w in LEXICON["insult_adjective"] + LEXICON["insult_noun"])
_JOINED_INSULT = re.compile(rf"^(?:you|your|ur|u)(?:are|r|re)?(?:a|an|so)?{_any(_JOINED_WORDS)}$")


def chat_words(text: str) -> str:
    """The comment as lower-case words with chat spellings spelt out (``u r`` -> ``you are``)."""
    words = _WORD.findall(deleet(normalise(text)))
    return " ".join(_SPELLINGS.get(w, w) for w in words)


def _has_link(text: str) -> bool:
    folded = fold(text)
    return "." in folded and _LINKISH.search(folded) is not None


def _category(words: str, text: str, aimed: bool) -> str:
    in_game = _IN_GAME.search(words) is not None
    if _THREAT_FIXED.search(words) or _WISH.search(words) or (not in_game and _THREAT_YOU.search(words)):
        return "threat"
    if _SEXUAL.search(words):
        return "sexual"
    link = _has_link(text)
    if _SCAM_PHRASE.search(words) or ((link or _PROMOTION.search(words)) and _SCAM_WORD.search(words)) \
            or (link and _PROMOTION.search(words)):
        return "scam"
    if _MENACE.search(words) or (not in_game and _THREAT_THIRD.search(words)):
        return "menace"
    if _insulting(words, aimed):
        return "insult"
    if aimed and _HOSTILE.search(words):
        return "hostile"
    return ""


def _insulting(words: str, aimed: bool) -> bool:
    if _STRONG_NOUN.search(words) or _PERSON_IS.search(words) or _ADJECTIVE_PERSON.search(words) \
            or _BARE_INSULT.search(words) or any(_JOINED_INSULT.match(w) for w in words.split()):
        return True
    second = _SECOND.search(words) is not None
    return second and (_YOU_ADJ.search(words) is not None or _INSULT_NOUN.search(words) is not None)


def _explained(words: str) -> bool:
    """There are hot words, and every one stands inside a harmless idiom."""
    hot = [m.start() for m in _HOT.finditer(words)]
    if not hot:
        return False
    spans = [m.span() for m in _IDIOM.finditer(words)]
    return all(any(a <= h + 1 and h < b for a, b in spans) for h in hot)


@functools.lru_cache(maxsize=CONTEXT_MEMO)
def read_context(text: str) -> Context:
    """Stage 1b for one comment (see the module docstring); chat repeats itself ("gg", "W",
    copied lines), so the newest CONTEXT_MEMO texts' answers are remembered."""
    words = chat_words(text)
    aimed = _SECOND.search(words) is not None or _ADDRESSED.search(words) is not None
    category = _category(words, text, aimed)
    return Context(category, aimed or category != "", _explained(words))
