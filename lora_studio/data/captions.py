"""Captions on disk: ``metadata.csv`` (``file_name``, ``caption``) and kohya-style ``.txt`` sidecars.

Both formats are read and written here, and converted both ways. Writes are atomic and the file they
replace is kept next to it with ``.bak`` appended (``metadata.csv.bak``, ``img_001.txt.bak``).
File names in ``metadata.csv`` are paths relative to the image folder, written with forward slashes.
An empty or whitespace-only caption counts as missing.
"""

from __future__ import annotations

import csv
import io
import logging
import os
from pathlib import Path
from typing import Iterable, Mapping

from lora_studio.errors import DatasetError
from lora_studio.fileio import atomic_write_bytes, atomic_write_text

log = logging.getLogger(__name__)

METADATA_NAME = "metadata.csv"
FILE_COLUMNS = ("file_name", "file", "image", "filename", "file_path", "path")
CAPTION_COLUMNS = ("caption", "text", "prompt")


def _norm_key(name: str) -> str:
    key = name.strip().replace("\\", "/")
    while key.startswith("./"):
        key = key[2:]
    return key


def _norm_ext(extension: str) -> str:
    extension = extension.strip()
    return extension if extension.startswith(".") else "." + extension


def _pick_column(header: list[str], wanted: tuple[str, ...]) -> int | None:
    lowered = [h.strip().lower() for h in header]
    for name in wanted:
        if name in lowered:
            return lowered.index(name)
    return None


def read_metadata_csv(path: str | os.PathLike) -> dict[str, str]:
    """Read ``metadata.csv`` into ``{relative file name: caption}`` (captions kept exactly as written)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DatasetError(f"Caption file '{path}' was not found.") from None
    except OSError as exc:
        raise DatasetError(f"Caption file '{path}' cannot be read: {exc.strerror or exc}.") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        log.warning("%s is not UTF-8; reading it as cp1252", path)
        text = raw.decode("cp1252", errors="replace")
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
    except StopIteration:
        raise DatasetError(f"Caption file '{path}' is empty; it needs a header row 'file_name,caption'.") from None
    except csv.Error as exc:
        raise DatasetError(f"Caption file '{path}' is not a valid CSV file ({exc}).") from None
    file_col = _pick_column(header, FILE_COLUMNS)
    cap_col = _pick_column(header, CAPTION_COLUMNS)
    if file_col is None or cap_col is None:
        missing = "file_name" if file_col is None else "caption"
        found = ", ".join(repr(h) for h in header) or "none"
        raise DatasetError(f"Caption file '{path.name}' has no '{missing}' column (columns found: {found}); "
                           f"it needs the columns 'file_name' and 'caption'.")
    rows: dict[str, str] = {}
    try:
        for line_no, row in enumerate(reader, start=2):
            if not row or all(not cell.strip() for cell in row):
                continue
            name = _norm_key(row[file_col]) if file_col < len(row) else ""
            if not name:
                log.warning("%s row %d has no file name; skipped", path.name, line_no)
                continue
            caption = row[cap_col] if cap_col < len(row) else ""
            if name in rows:
                log.warning("%s lists '%s' twice; the later caption wins", path.name, name)
            rows[name] = caption
    except csv.Error as exc:
        raise DatasetError(f"Caption file '{path}' is not a valid CSV file ({exc}).") from None
    return rows


def metadata_csv_text(rows: Mapping[str, str]) -> str:
    """The CSV text ``write_metadata_csv`` writes (header ``file_name,caption``)."""
    buf = io.StringIO(newline="")
    writer = csv.writer(buf, lineterminator="\n", quoting=csv.QUOTE_MINIMAL)
    writer.writerow(["file_name", "caption"])
    for name, caption in rows.items():
        writer.writerow([_norm_key(str(name)), caption])
    return buf.getvalue()


def _backup(path: Path) -> Path | None:
    """Copy ``path`` to ``path + '.bak'`` (atomically) when it exists."""
    if not path.exists():
        return None
    bak = path.with_name(path.name + ".bak")
    atomic_write_bytes(bak, path.read_bytes())
    return bak


def write_metadata_csv(path: str | os.PathLike, rows: Mapping[str, str], backup: bool = True) -> Path:
    """Write ``{file name: caption}`` atomically; the previous file is kept as ``metadata.csv.bak``."""
    path = Path(path)
    text = metadata_csv_text(rows)
    if backup:
        if path.exists() and path.read_bytes() == text.encode("utf-8"):
            return path  # unchanged: keep the older backup
        _backup(path)
    return atomic_write_text(path, text)


def sidecar_path(image: str | os.PathLike, extension: str = ".txt") -> Path:
    """The kohya caption file for an image: same folder, same stem, ``extension``."""
    return Path(image).with_suffix(_norm_ext(extension))


def _resolve(folder: Path, image: str | os.PathLike) -> Path:
    image = Path(image)
    return image if image.is_absolute() else folder / image


def path_inside(folder: str | os.PathLike, name: str | os.PathLike, what: str = "image folder") -> Path:
    """``folder / name``, refusing a name that leads outside ``folder``.

    An absolute name, one that climbs out with ``..`` or one that goes through a link to elsewhere raises
    ``DatasetError``: names typed in (or sent to) the app never choose where a file is written.
    """
    full = _resolve(Path(folder), name)
    root = os.path.normcase(os.path.realpath(folder))
    real = os.path.normcase(os.path.realpath(full))
    try:
        inside = os.path.commonpath([root, real]) == root
    except ValueError:  # another drive (Windows)
        inside = False
    if not inside:
        raise DatasetError(f"'{name}' is outside the {what} '{folder}'; files are only written inside it. "
                           "Use file names relative to that folder.")
    return full


def read_txt_captions(folder: str | os.PathLike, images: Iterable[str | os.PathLike],
                      extension: str = ".txt") -> dict[Path, str]:
    """``{image: caption}`` from sidecar files (keys as given; relative paths resolve against ``folder``)."""
    folder = Path(folder)
    out: dict[Path, str] = {}
    for image in images:
        side = sidecar_path(_resolve(folder, image), extension)
        if not side.is_file():
            continue
        try:
            raw = side.read_bytes()
        except OSError as exc:
            log.warning("Cannot read caption file %s: %s", side, exc)
            continue
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError:
            text = raw.decode("cp1252", errors="replace")
        out[Path(image)] = text.strip()
    return out


def write_txt_captions(folder: str | os.PathLike, captions: Mapping[str | os.PathLike, str],
                       extension: str = ".txt", backup: bool = True) -> list[Path]:
    """Write one sidecar per image (atomic; a changed file's old text kept as ``.txt.bak``).

    Every sidecar must lie inside ``folder`` (``path_inside``); one that does not stops the call before
    anything is written."""
    folder = Path(folder)
    sides = {image: path_inside(folder, sidecar_path(image, extension)) for image in captions}
    written: list[Path] = []
    for image, caption in captions.items():
        side = sides[image]
        data = caption.strip().encode("utf-8")
        if side.exists():
            if side.read_bytes() == data:
                written.append(side)
                continue
            if backup:
                _backup(side)
        atomic_write_bytes(side, data)
        written.append(side)
    return written


def relative_name(image: str | os.PathLike, root: str | os.PathLike) -> str:
    """The ``file_name`` of an image in ``metadata.csv``: its path relative to ``root``, forward slashes."""
    image, root = Path(image), Path(root)
    try:
        return image.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return Path(os.path.relpath(image.resolve(), root.resolve())).as_posix()


def _match_metadata(rows: Mapping[str, str], train_data_dir: Path, csv_dir: Path,
                    images: list[Path]) -> dict[Path, str]:
    """Match CSV keys to images: relative to the data folder, then to the CSV's folder, then unique bare name."""
    stripped = {k: v.strip() for k, v in rows.items() if v.strip()}
    lowered = {k.lower(): v for k, v in stripped.items()}
    by_base: dict[str, list[str]] = {}
    for key in stripped:
        by_base.setdefault(key.rsplit("/", 1)[-1], []).append(key)
    image_bases: dict[str, int] = {}
    for img in images:
        image_bases[img.name] = image_bases.get(img.name, 0) + 1
    out: dict[Path, str] = {}
    for img in images:
        full = _resolve(train_data_dir, img)
        candidates = [relative_name(full, train_data_dir)]
        if csv_dir.resolve() != train_data_dir.resolve():
            candidates.append(relative_name(full, csv_dir))
        caption = next((stripped[c] for c in candidates if c in stripped), None)
        if caption is None:
            caption = next((lowered[c.lower()] for c in candidates if c.lower() in lowered), None)
        if caption is None and image_bases[img.name] == 1 and len(by_base.get(img.name, [])) == 1:
            caption = stripped[by_base[img.name][0]]
        if caption is not None:
            out[img] = caption
    return out


def load_captions(train_data_dir: str | os.PathLike, images: Iterable[str | os.PathLike],
                  metadata_path: str | os.PathLike | None = None,
                  caption_extension: str = ".txt") -> dict[Path, str]:
    """A caption for each image that has one: ``metadata.csv`` first, then ``.txt`` sidecars.

    ``metadata_path`` defaults to ``<train_data_dir>/metadata.csv`` when that file exists. Keys are the
    image paths as given. Images with no caption (or an empty one) are left out.
    """
    root = Path(train_data_dir)
    image_list = [Path(p) for p in images]
    out: dict[Path, str] = {}
    if metadata_path is not None:
        csv_path: Path | None = Path(metadata_path)
        if not csv_path.is_file():
            raise DatasetError(f"Caption file '{csv_path}' was not found.")
    else:
        default = root / METADATA_NAME
        csv_path = default if default.is_file() else None
    if csv_path is not None:
        out.update(_match_metadata(read_metadata_csv(csv_path), root, csv_path.parent, image_list))
    missing = [p for p in image_list if p not in out]
    if missing:
        for img, caption in read_txt_captions(root, missing, caption_extension).items():
            if caption:
                out[img] = caption
    return out


def csv_to_txt(csv_path: str | os.PathLike, train_data_dir: str | os.PathLike, images: Iterable[Path],
               extension: str = ".txt", overwrite: bool = False) -> list[Path]:
    """Write the captions of ``metadata.csv`` as sidecars (existing sidecars kept unless ``overwrite``)."""
    root = Path(train_data_dir)
    image_list = [Path(p) for p in images]
    captions = _match_metadata(read_metadata_csv(csv_path), root, Path(csv_path).parent, image_list)
    if not overwrite:
        existing = read_txt_captions(root, captions, extension)
        captions = {k: v for k, v in captions.items() if not existing.get(k)}
    return write_txt_captions(root, captions, extension)


def txt_to_csv(train_data_dir: str | os.PathLike, images: Iterable[Path], csv_path: str | os.PathLike,
               extension: str = ".txt", overwrite: bool = False) -> Path:
    """Write the sidecar captions into ``metadata.csv`` (rows already in the CSV kept unless ``overwrite``)."""
    root = Path(train_data_dir)
    csv_path = Path(csv_path)
    image_list = [Path(p) for p in images]
    rows: dict[str, str] = read_metadata_csv(csv_path) if csv_path.is_file() else {}
    for img, caption in read_txt_captions(root, image_list, extension).items():
        if not caption:
            continue
        key = relative_name(_resolve(root, img), root)
        if overwrite or not rows.get(key, "").strip():
            rows[key] = caption
    return write_metadata_csv(csv_path, rows)
