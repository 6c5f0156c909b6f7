"""Sentence splitting for ``--split-sentences`` with nltk's Punkt, never downloading its data."""

import nltk
from nltk.tokenize.punkt import PunktLanguageVars, PunktParameters, PunktSentenceTokenizer


class KeepNewlinesLanguageVars(PunktLanguageVars):
    """Punkt's English rules, except that the whitespace after a sentence end stays with that
    sentence, so ``--keep-newlines`` keeps paragraph breaks in the token stream."""

    _period_context_fmt = r"""
        %(SentEndChars)s             # a potential sentence ending
        \s*                          # the whitespace after it belongs to this sentence
        (?=(?P<after_tok>
            %(NonWord)s              # either other punctuation
            |
            (?P<next_tok>\S+)        # or the next sentence's first token
        ))"""


def find_punkt_parameters(language: str = "english") -> PunktParameters | None:
    """Returns the installed Punkt model for ``language``, or None when nltk has no data.

    Looks for ``punkt_tab`` (nltk >= 3.8.2) then the older pickled ``punkt``, only on disk
    (``nltk.data.path``, ``NLTK_DATA``).
    """
    try:
        return nltk.tokenize.PunktTokenizer(language)._params
    except (LookupError, AttributeError, ValueError):
        pass
    try:
        return nltk.data.load(f"tokenizers/punkt/{language}.pickle")._params
    except (LookupError, ValueError, OSError):
        return None


UNTRAINED_FLAG = "--untrained-sentence-splitter"


def punkt_missing_message(language: str, allowed: bool) -> str:
    """What to print when ``find_punkt_parameters`` finds nothing: a warning when the user passed
    ``UNTRAINED_FLAG`` (``allowed``), else the error that says how to install the data."""
    where = f"no nltk punkt data for {language!r} on this machine (searched {nltk.data.path})"
    if allowed:
        return (
            f"warning: {where}; splitting sentences with nltk's untrained Punkt tokenizer "
            f"({UNTRAINED_FLAG})"
        )
    return (
        f"error: --split-sentences: {where}. Install it with `python -m nltk.downloader "
        "punkt_tab` (offline: copy an nltk_data directory holding tokenizers/punkt_tab and "
        f"set NLTK_DATA to it), or pass {UNTRAINED_FLAG} to split with nltk's untrained "
        "Punkt tokenizer, whose sentences differ from Megatron-LM's"
    )


class SentenceSplitter:
    """Splits a text into sentences.

    Args:
        punkt_parameters: A trained Punkt model, or None for nltk's untrained tokenizer.
        keep_newlines: Keep the whitespace (newlines) after each sentence.
    """

    def __init__(self, punkt_parameters: PunktParameters | None, keep_newlines: bool) -> None:
        lang_vars = KeepNewlinesLanguageVars() if keep_newlines else PunktLanguageVars()
        self._punkt = PunktSentenceTokenizer(lang_vars=lang_vars)
        if punkt_parameters is not None:
            self._punkt._params = punkt_parameters

    def __call__(self, text: str) -> list[str]:
        return self._punkt.tokenize(text)
