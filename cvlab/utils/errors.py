"""The one exception type that the CLI turns into a single line and exit code 2, and the "did you mean" hint
every such message carries."""
import difflib
from collections.abc import Iterable


class UserError(Exception):
    """Bad input from the user: a wrong option, key, value, path or file. The message says what to do."""


def missing_checkpoint(what: str, path, file: str = "") -> UserError:
    """The error for a checkpoint path that is not a file (``what`` names the option, ``file`` the usual one)."""
    return UserError(f"{what} {str(path)!r} does not exist; runs keep theirs in "
                     f"runs/<task>/<model>/<time>/weights/{file}.")


def suggest(word: str, candidates: Iterable[str]) -> str:
    """`` Did you mean a, b?`` with up to three close names (difflib), or ``""`` when none is close."""
    close = difflib.get_close_matches(word, list(candidates), n=3, cutoff=0.5)
    return f" Did you mean {', '.join(close)}?" if close else ""
