"""Names that become paths or table cells: reduced to safe file names, checked at load, escaped."""

from __future__ import annotations

import errno
import os
import re
import reprlib
import unicodedata
from pathlib import Path
from typing import Any

from wmbench.errors import WmbenchError

# File systems allow 255 bytes per name; leave room for suffixes (".csv", "-detect_stat.png", ".jsonl").
MAX_NAME_BYTES = 120
_UNSAFE = re.compile(r"[^\w.+-]+")  # \w: letters and digits of any script, and "_"


CONTROL_CATEGORIES = ("Cc", "Cf", "Zl", "Zp")  # controls, format characters (bidi overrides, zero widths), line and paragraph separators


def is_control(c: str) -> bool:
    """Whether the character ``c`` is a control character (``CONTROL_CATEGORIES``)."""
    return unicodedata.category(c) in CONTROL_CATEGORIES


def control_chars(text: str) -> bool:
    """Whether ``text`` holds a control character (newline, tab, NUL, escape sequences, bidi overrides...)."""
    return any(is_control(c) for c in text)


def visible_control(c: str) -> str:
    """A control character as the text Python writes for it in a string literal: ``\\x1b``, ``\\u202e``."""
    code = ord(c)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def name_problem(text: str, what: str = "name") -> str | None:
    """Why ``text`` cannot be a name or label (control characters, too long in bytes), or None."""
    if control_chars(text):
        return f"the {what} holds control characters"
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_NAME_BYTES:
        return f"the {what} is {size} bytes long in UTF-8 (at most {MAX_NAME_BYTES}: it names files)"
    return None


# Greek and Cyrillic letters drawn like Latin ones (after Unicode's confusables.txt, the letters that
# look like one ASCII letter), and the Latin dotless i: what NFKC leaves apart but a reader does not.
_LOOKALIKES = str.maketrans(
    "АВЕЅІЈКМНОРСТХУҮԚԜӀҺԀѴаеорсухѕіјԁһԛԝӏүѵ" "ΑΒΕΖΗΙΚΜΝΟΡΤΥΧͿοιανρυγϳ" "ı",
    "ABESIJKMHOPCTXYYQWIHDVaeopcyxsijdhqwlyv" "ABEZHIKMNOPTYXJoiavpuyj" "i",
)


def lookalike_key(text: str) -> str:
    """What ``text`` reads as, for comparing labels with names: NFKC-normalised (fullwidth
    ``ｎｏｎｅ``, mathematical ``𝐧𝐨𝐧𝐞`` and ligatures become plain letters), Greek and Cyrillic
    look-alikes of Latin letters read as those (Cyrillic ``nоnе``, Greek ``ΝΟΝΕ``), casefolded."""
    return unicodedata.normalize("NFKC", text).translate(_LOOKALIKES).casefold()


# Output files a scenario name must not collide with: <name>.csv, <name>.md, plots <name>/, <name>.jsonl.
# A run's own files (.csv, .md, .html, a store's .jsonl), `wmbench null`'s and `curve`'s, and a
# `curve --holdout`'s (<name>_holdout_curve.*)
OUTPUT_SUFFIXES = (".csv", ".md", ".html", ".jsonl", "_null", "_curve", "_holdout")


def output_name_problem(name: object) -> str | None:
    """Why ``name`` cannot name a run's output files (a scenario's ``name``, ``leaderboard --name``), or None."""
    if not isinstance(name, str) or not name.strip() or name.startswith(".") or any(c in name for c in "/\\\0"):
        return "required: a non-empty name without '/' or a leading '.' (it names the output files)"
    if name.lower().endswith(OUTPUT_SUFFIXES):
        return f"a name ending in {', '.join(OUTPUT_SUFFIXES)} collides with another scenario's output files"
    return name_problem(name)


def safe_filename(text: object, max_bytes: int = MAX_NAME_BYTES, default: str = "results") -> str:
    """``text`` reduced to one harmless file name: no separator, no leading dot, no control
    character, at most ``max_bytes`` bytes; ``default`` if nothing is left."""
    slug = _UNSAFE.sub("_", unicodedata.normalize("NFC", str(text))).strip("._-+")
    encoded = slug.encode("utf-8")[:max_bytes]
    slug = encoded.decode("utf-8", "ignore").strip("._-+")
    return slug or default


def check_entries(base: Path, files: tuple[str, ...] = (), folders: tuple[str, ...] = ()) -> None:
    """Refuse (exit 2, before anything is written) output ``files`` of ``base`` that are folders and
    output ``folders`` that are files (or links to none): each would stop the writing midway, after
    the work, with some outputs written and others not. A link to a file is replaced, not followed."""
    for name in files:
        path = inside(base, name)
        if path.is_dir() and not path.is_symlink():
            raise WmbenchError(f"{path} is a folder: it is in the way of an output file (move it, or choose another --out)")
    for name in folders:
        path = inside(base, name)
        if (path.exists() or path.is_symlink()) and not path.is_dir():
            raise WmbenchError(f"{not_a_folder_text(path)}; it is in the way of the plots' folder (move it, or choose another --out)")


def not_a_folder(path: Path) -> Path | None:
    """What stops ``path`` from being a folder, or from being made one: the nearest of it and its
    parents that exists (or is a link) when that is not a folder (a file, a dangling or looping
    link); None when it is one (``path`` itself, or where ``path`` would be made)."""
    existing = next(p for p in (path, *path.parents) if p.exists() or p.is_symlink())  # "." or "/" at the latest
    return None if existing.is_dir() else existing


def not_a_folder_text(path: Path) -> str:
    """``path is not a folder``, saying where it is a broken link (``: a symbolic link to T, which
    does not exist``): a link looks like a folder in a listing."""
    link = broken_link(path)
    return f"{path} is not a folder" + (f": {link}" if link else "")


def broken_link(path: Path) -> str | None:
    """What is wrong with ``path`` where it is a symbolic link that cannot be followed ("a symbolic
    link to T, which does not exist" or "..., which loops"), for a one-line message; None where it
    is no link, or one that leads somewhere."""
    if not path.is_symlink():
        return None
    try:
        path.stat()
    except OSError as exc:
        reason = {errno.ENOENT: "does not exist", errno.ENOTDIR: "does not exist", errno.ELOOP: "loops"}
        why = reason.get(exc.errno or 0, f"cannot be reached ({exc.strerror})")
        return f"a symbolic link to {os.readlink(path)}, which {why}"
    return None


def inside(base: Path, name: str) -> Path:
    """``base / name``, refused (exit 2) unless it is a plain entry of ``base``."""
    path = Path(base) / name
    if name in ("", ".", "..") or Path(name).name != name or "\\" in name or "\0" in name or path.parent != Path(base):
        raise WmbenchError(f"refusing to write {name!r}: output names must be plain file names inside {base}")
    return path


_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 60
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = 4
_REPR.maxlevel = 2


def shown(value: Any) -> str:
    """``repr(value)`` cut short: what an error message may render of a value from a file."""
    try:
        return _REPR.repr(value)
    except (ValueError, RecursionError):  # an int too long to print, a self-referencing value
        return f"<{type(value).__name__}>"


def as_typed(text: str, limit: int = 80) -> str:
    """A command-line argument as the user typed it, for an error message: unchanged when short,
    else ``shown`` (cut, quoted), so the reason after it stays on the line."""
    return text if len(text) <= limit and not control_chars(text) else shown(text)


# Spreadsheets run a cell starting with one of these as a formula (OWASP "CSV injection").
_FORMULA = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(text: str) -> str:
    """A text cell safe to open in a spreadsheet: prefixed with ``'`` when it could start a
    formula (and when it starts with ``'`` itself, so ``csv_uncell`` restores it exactly). A carriage
    return becomes a newline: CSV writers quote newlines but not always a lone CR, which would
    start a new row (and a formula) in a spreadsheet."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return "'" + text if text.startswith((*_FORMULA, "\n", "'")) else text


def csv_uncell(text: str) -> str:
    """The text ``csv_cell`` escaped."""
    return text[1:] if text.startswith("'") and text[1:].startswith((*_FORMULA, "\n", "'")) else text


# A backslash that would escape the ASCII punctuation after it; what makes code, emphasis or
# strikethrough (an underscore only where it is not inside a word: ``key_leak`` stays), and ``|``.
_BACKSLASH = re.compile(r"\\(?=[!-/:-@\[-`{-~])")
_MARKUP = re.compile(r"[`*~|]|_(?![^\W_])|(?<![^\W_])_")


def md_cell(text: object) -> str:
    """Text for a Markdown table cell or heading: ``|`` escaped, line breaks made spaces, what would
    make code, emphasis or strikethrough (a backtick, ``*``, ``~``, an ``_`` at a word's edge) and a
    backslash before punctuation backslash-escaped, what a Markdown renderer would take for HTML (a tag, comment or entity: ``<b>``, ``&lt;``) escaped, and
    the ``](`` of an inline link or image (``[x](javascript:...)``, ``![](https://tracker/p.png)``,
    fetched when the page is opened), so a label shows as written; ``< 2``, ``a & b`` and
    ``[0.1, 0.2]`` stay as they are. Any other control character (``control_chars``: a tab, a
    terminal escape ``\\x1b``, a bidi override ``\\u202e`` that would reorder what follows, say in an
    exception's message in ``failure`` or ``detect_note``) is shown as its escape, ``\\x1b``."""
    text = re.sub(r"[\r\n\u2028\u2029]+", " ", str(text))
    text = _BACKSLASH.sub(r"\\\\", text)  # before the escapes below add their own
    text = _MARKUP.sub(r"\\\g<0>", text).replace("](", "]\\(")
    if control_chars(text):
        text = "".join(visible_control(c) if is_control(c) else c for c in text)
    text = re.sub(r"&(?=#?\w+;)", "&amp;", text)
    return re.sub(r"<(?=[A-Za-z/!?])", "&lt;", text)
