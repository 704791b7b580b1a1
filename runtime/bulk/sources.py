"""Where a bulk job's images come from: one ordered, lazily read stream of (id, item).

An item is a path (str), the image's bytes, or a `BadItem` saying why that input cannot be read
(the job records it as a failed row, so every input has its row). The order is fixed by the
inputs alone (sorted folder walks, table rows, tar members), never by a count.

Each item has a *stamp* (`stamp_of`): a file's size and modification time, a hash of bytes that
are already in memory (table cells, tar members), or a hash of a BadItem's reason. A rerun on the
same output embeds an id again only when its stamp changed, so a file rewritten under the same
name is re-embedded while untouched ones are never decoded.

    source = open_source(["photos/", "more.parquet", "shards/0001.tar"], column=None)
    for item_id, item in source: ...
    source.count()        # known for lists and Parquet tables, None for streamed folders/tars

Paths read from a table are relative to the table's folder (or to --root) and may not leave it:
an absolute path, one that climbs out with '..', or one that a symbolic link takes outside (paths
are resolved, not only normalised) fails that row with a one-line error. Tar members are read in
stream order; a member whose name is absolute or climbs out fails its sample, and a tar that ends
early (cut inside a member or a header, or without its end-of-archive blocks) gives a row saying
it is truncated.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import stat
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from common.errors import UserError
from common.files import iter_image_files
from common.images import is_image_file

TABLE_SUFFIXES = (".parquet", ".pq", ".csv", ".tsv")
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
# columns tried, in order, when --column is not given
PATH_COLUMNS = ("path", "image_path", "file", "filename", "image")
BYTES_COLUMNS = ("bytes", "image_bytes", "jpg", "png", "image")
ID_COLUMNS = ("id", "key", "image_id")
MAX_ITEM_BYTES = 64 << 20  # a tar member or table cell above this is refused, not read
# tarfile's own header errors (not in its __all__): the end marker, and a header missing or cut


def _tar_errors(*names: str) -> tuple[type[BaseException], ...]:
    return tuple(getattr(tarfile, n) for n in names if hasattr(tarfile, n))


TAR_END = _tar_errors("EOFHeaderError")
CORRUPT_SUFFIX = "/#corrupt"  # the id of the row saying why a tar stops early
TAR_CUT = _tar_errors("EmptyHeaderError", "TruncatedHeaderError")


class SourceError(UserError, ValueError):
    """An input that cannot be used at all (unreadable table, unknown column): one line."""


@dataclass(frozen=True)
class BadItem:
    """An input that cannot be decoded, with a one-line reason naming it."""

    message: str


class Source:
    """Ordered (id, item) pairs, read lazily; subclasses say how."""

    kind = "source"

    def __iter__(self) -> Iterator[tuple[str, Any]]:
        raise NotImplementedError

    def count(self) -> int | None:
        """Number of items if known without reading them, else None."""
        return None

    def estimate(self) -> int | None:
        """Number of items, counted quickly where it can be (a folder walk without reading a
        file); may take a while, so the job calls it beside its work. Default: `count()`."""
        return self.count()

    def identity(self) -> dict:
        """What names these inputs whatever their content (kind and path): a rerun with the
        same identity updates the output, another one is another job."""
        raise NotImplementedError

    def signature(self) -> dict:
        """What the manifest records of these inputs (paths, sizes, mtimes; for a folder, its
        file count, total size and newest mtime once walked)."""
        return self.identity()


def stamp_of(item: Any) -> str:
    """What tells whether an input changed since its row was written: 'SIZE-MTIME_NS' of a file,
    'h' + a hash of bytes in memory, 'bad-' + a hash of a BadItem's reason, 'missing'."""
    if isinstance(item, BadItem):
        return "bad-" + hashlib.blake2b(item.message.encode(), digest_size=8).hexdigest()
    if isinstance(item, (bytes, bytearray, memoryview)):
        return "h" + hashlib.blake2b(item, digest_size=16).hexdigest()
    try:
        st = os.stat(item)
    except (OSError, TypeError, ValueError):
        return "missing"
    return f"{st.st_size}-{st.st_mtime_ns}"


def _file_signature(path: str) -> dict:
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):  # a pipe: only its name; the shards' ids are checked
        return {"path": os.path.abspath(path), "stream": True}
    return {"path": os.path.abspath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


class ItemsSource(Source):
    """An in-memory list of (id, path): image files, list files, built-in datasets."""

    kind = "items"

    def __init__(self, items: list[tuple[str, str]], label: str):
        self.items, self.label = items, label

    def __iter__(self):
        for item_id, path in self.items:
            # a folder here would be expanded by the pipeline and shift every later row
            yield item_id, (BadItem(f"{item_id}: is a folder, not an image") if
                            os.path.isdir(path) else path)

    def count(self):
        return len(self.items)

    def identity(self):
        return {"kind": self.kind, "label": self.label}

    def signature(self):
        digest = hashlib.sha256(json.dumps(self.items).encode()).hexdigest()[:16]
        return {**self.identity(), "n": len(self.items), "sha": digest}


class FolderSource(Source):
    """Image files under a folder, streamed in sorted order (never listed in one go)."""

    kind = "folder"

    def __init__(self, root: str, on_error=None):
        self.root, self.on_error = root, on_error
        self.walked: dict[str, int] | None = None  # files, bytes, newest mtime: after a walk

    def __iter__(self):
        files = size = newest = 0
        for path in iter_image_files(self.root, on_error=self.on_error):
            try:
                st = os.stat(path)
                size, newest = size + st.st_size, max(newest, st.st_mtime_ns)
            except OSError:
                pass  # the pipeline reports it on its row
            files += 1
            yield path, path
        self.walked = {"files": files, "bytes": size, "newest_mtime_ns": newest}

    def estimate(self):
        return sum(1 for _ in iter_image_files(self.root, on_error=lambda p, m: None))

    def identity(self):
        return {"kind": self.kind, "path": os.path.abspath(self.root)}

    def signature(self):
        return {**self.identity(), **(self.walked or {})}


def resolve_table_path(value: Any, base: str, where: str) -> str | BadItem:
    """A path cell -> the file it names inside `base`, or a BadItem saying why not.

    Relative paths are joined to `base` and must stay inside it; absolute paths are refused,
    so a table cannot make the job read files outside the folder it was given."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return BadItem(f"{where}: empty path")
    if not isinstance(value, str):
        return BadItem(f"{where}: path is a {type(value).__name__}, not text")
    value = value.strip()
    if os.path.isabs(value) or value.startswith(("/", "\\")) or os.path.splitdrive(value)[0]:
        return BadItem(f"{where}: absolute path {value!r} refused; write it relative to the "
                       f"table's folder, or pass --root")
    joined = os.path.normpath(os.path.join(base, value))
    if os.path.relpath(joined, base).split(os.sep)[0] == os.pardir:
        return BadItem(f"{where}: path {value!r} leaves {base}; refused")
    # resolved, not only normalised: a symbolic link may lead out of the folder
    real, real_base = os.path.realpath(joined), os.path.realpath(base)
    if os.path.commonpath([real, real_base]) != real_base:
        return BadItem(f"{where}: path {value!r} leads out of {base} through a symbolic "
                       f"link; refused")
    if os.path.isdir(joined):
        return BadItem(f"{where}: {value!r} is a folder, not an image")
    return joined


def _cell_bytes(value: Any, where: str) -> bytes | BadItem:
    if value is None:
        return BadItem(f"{where}: no image bytes (null)")
    if isinstance(value, dict) and "bytes" in value:  # {bytes, path} image structs
        return _cell_bytes(value["bytes"], where)
    if not isinstance(value, (bytes, bytearray)):
        return BadItem(f"{where}: image cell is a {type(value).__name__}, not bytes")
    if len(value) > MAX_ITEM_BYTES:
        return BadItem(f"{where}: {len(value)} bytes is more than the {MAX_ITEM_BYTES} allowed")
    return bytes(value)


class TableSource(Source):
    """Rows of a Parquet or CSV table: a path column (relative to the table's folder or to
    `root`) or, in Parquet, an image-bytes column. Read in record batches: memory stays flat."""

    kind = "table"

    def __init__(self, path: str, *, column: str | None = None, id_column: str | None = None,
                 root: str | None = None):
        self.path, self.root = path, os.path.abspath(root or os.path.dirname(os.path.abspath(path)))
        self.name = os.path.basename(path)
        self.is_parquet = path.lower().endswith((".parquet", ".pq"))
        names, binary = self._columns()
        self.column, self.holds_bytes = self._pick_column(names, binary, column)
        if id_column is not None and id_column not in names:
            raise SourceError(f"{path}: no id column {id_column!r}; columns are "
                              f"{', '.join(names)}")
        self.id_column = id_column or next((c for c in ID_COLUMNS if c in names
                                            and c != self.column), None)

    def _columns(self) -> tuple[list[str], set[str]]:
        try:
            if self.is_parquet:
                import pyarrow as pa
                import pyarrow.parquet as pq
                schema = pq.read_schema(self.path)
                binary = {f.name for f in schema if pa.types.is_binary(f.type)
                          or pa.types.is_large_binary(f.type)
                          or (pa.types.is_struct(f.type) and f.type.get_field_index("bytes") >= 0)}
                return list(schema.names), binary
            with open(self.path, newline="", encoding="utf-8") as f:
                header = next(csv.reader(f, dialect=self._dialect()), None)
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise SourceError(f"{self.path}: cannot read the table ({e})") from e
        if not header:
            raise SourceError(f"{self.path}: the table has no header row")
        return [h.strip() for h in header], set()

    def _dialect(self):
        return csv.excel_tab if self.path.lower().endswith(".tsv") else csv.excel

    def _pick_column(self, names: list[str], binary: set[str], column: str | None
                     ) -> tuple[str, bool]:
        if column is not None:
            if column not in names:
                raise SourceError(f"{self.path}: no column {column!r}; columns are "
                                  f"{', '.join(names)}")
            return column, column in binary
        for c in BYTES_COLUMNS:
            if c in binary:
                return c, True
        if len(binary) == 1:
            return next(iter(binary)), True
        for c in PATH_COLUMNS:
            if c in names and c not in binary:
                return c, False
        raise SourceError(f"{self.path}: no image column found among {', '.join(names)}; "
                          f"name it with --column")

    def _rows(self) -> Iterator[tuple[Any, Any]]:
        """(value, id or None) per row, in file order."""
        columns = [self.column] + ([self.id_column] if self.id_column else [])
        if self.is_parquet:
            import pyarrow.parquet as pq
            with pq.ParquetFile(self.path) as f:
                # small record batches: a bytes column holds whole images
                for batch in f.iter_batches(batch_size=64, columns=columns):
                    values = batch.column(0).to_pylist()
                    ids = (batch.column(1).to_pylist() if self.id_column
                           else [None] * len(values))
                    yield from zip(values, ids)
            return
        with open(self.path, newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f, dialect=self._dialect()):
                row = {(k or "").strip(): v for k, v in row.items()}
                yield row.get(self.column), row.get(self.id_column) if self.id_column else None

    def __iter__(self):
        for i, (value, given_id) in enumerate(self._rows()):
            where = f"{self.name} row {i}"
            if self.holds_bytes:
                item_id = str(given_id) if given_id is not None else f"{self.name}#{i}"
                yield item_id, _cell_bytes(value, f"{where} ({item_id})")
            else:
                item_id = (str(given_id) if given_id is not None else
                           str(value) if value is not None else f"{self.name}#{i}")
                yield item_id, resolve_table_path(value, self.root, where)

    def count(self):
        if not self.is_parquet:
            return None
        import pyarrow.parquet as pq
        return pq.ParquetFile(self.path).metadata.num_rows

    def estimate(self):
        if self.is_parquet:
            return self.count()
        return sum(1 for _ in self._rows())  # a CSV: its rows, without reading an image

    def identity(self):
        return {"kind": self.kind, "path": os.path.abspath(self.path), "column": self.column,
                "id_column": self.id_column, "root": self.root}

    def signature(self):
        return {**self.identity(), **_file_signature(self.path)}


def split_member_name(name: str) -> tuple[str, str]:
    """WebDataset naming: 'dir/0001.seg.png' -> key 'dir/0001', extension 'seg.png'."""
    folder, base = os.path.split(name)
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext


def _unsafe_member(name: str) -> bool:
    parts = name.replace("\\", "/").split("/")
    return name.startswith(("/", "\\")) or ".." in parts or bool(os.path.splitdrive(name)[0])


class TarSource(Source):
    """A WebDataset tar shard: members sharing a key (0001.jpg, 0001.cls) form one sample,
    whose id is '<tar name>/<key>' and whose item is its image member's bytes. The tar is
    read as a stream (no index, no seeking), so it may be compressed or arrive on a pipe."""

    kind = "tar"

    def __init__(self, path: str):
        self.path, self.name = path, os.path.basename(path)

    def __iter__(self):
        key: str | None = None
        item: Any = None
        ended: list[str] = []  # how the member headers ended: 'end' (the marker) or 'cut'

        class Header(tarfile.TarInfo):
            """tarfile stops without a word at a header cut short or missing: note it."""

            @classmethod
            def fromtarfile(cls, tar):
                try:
                    return super().fromtarfile(tar)
                except TAR_END:
                    ended.append("end")
                    raise
                except TAR_CUT:
                    ended.append("cut")
                    raise

        try:
            with tarfile.open(self.path, mode="r|*", tarinfo=Header) as tar:
                for member in tar:
                    if member.isdir():
                        continue
                    k, _ = split_member_name(member.name)
                    if k != key:
                        if key is not None:
                            yield self._sample(key, item)
                        key, item = k, None
                    if item is not None:  # the sample already has its image (or its error)
                        continue
                    item = self._member(tar, member)
        except (tarfile.TarError, OSError, EOFError) as e:
            cut = "end of data" in str(e) or isinstance(e, EOFError)
            yield from self._broken(key, item, f"truncated archive ({e})" if cut else
                                    f"the tar cannot be read further ({e})")
            return
        if "cut" in ended:
            yield from self._broken(key, item, "truncated archive (it ends without its "
                                               "end-of-archive blocks)")
            return
        if key is not None:
            yield self._sample(key, item)

    def _broken(self, key: str | None, item: Any, why: str) -> Iterator[tuple[str, Any]]:
        """The samples of a tar that stops early: the last one, then a row saying why."""
        where = f"{self.name}/{key}" if key is not None else self.name
        if key is not None:
            yield self._sample(key, item if item is not None else BadItem(
                f"{where}: {why}; this sample was cut"))
        yield (f"{self.name}{CORRUPT_SUFFIX}",
               BadItem(f"{where}: {why}; later samples of {self.name} are missing"))

    def _sample(self, key: str, item: Any) -> tuple[str, Any]:
        item_id = f"{self.name}/{key}"
        if item is None:
            return item_id, BadItem(f"{item_id}: no image member in this sample")
        return item_id, item

    def _member(self, tar: tarfile.TarFile, member: tarfile.TarInfo) -> Any:
        """The image bytes of `member`, a BadItem, or None when it is not an image."""
        where = f"{self.name}/{member.name}"
        if _unsafe_member(member.name):
            return BadItem(f"{where}: member name leaves the archive; refused")
        if not is_image_file(member.name):
            return None  # labels, captions, json: not ours to read
        if not member.isfile():
            return BadItem(f"{where}: not a regular file (link or device); refused")
        if member.size > MAX_ITEM_BYTES:
            return BadItem(f"{where}: {member.size} bytes is more than the {MAX_ITEM_BYTES} "
                           f"allowed")
        f = tar.extractfile(member)
        if f is None:
            return BadItem(f"{where}: cannot be read")
        data = f.read()
        if len(data) != member.size:
            return BadItem(f"{where}: truncated archive ({len(data)} of {member.size} bytes)")
        return data

    def identity(self):
        return {"kind": self.kind, "path": os.path.abspath(self.path)}

    def signature(self):
        return {**self.identity(), **_file_signature(self.path)}


class ChainSource(Source):
    """Several sources one after the other."""

    kind = "chain"

    def __init__(self, parts: list[Source]):
        self.parts = parts

    def __iter__(self):
        for part in self.parts:
            yield from part

    def count(self):
        counts = [p.count() for p in self.parts]
        return None if any(c is None for c in counts) else sum(c for c in counts if c)

    def estimate(self):
        counts = [p.estimate() for p in self.parts]
        return None if any(c is None for c in counts) else sum(c for c in counts if c)

    def identity(self):
        return {"kind": self.kind, "parts": [p.identity() for p in self.parts]}

    def signature(self):
        return {"kind": self.kind, "parts": [p.signature() for p in self.parts]}


def open_source(inputs: Iterable[str], *, column: str | None = None,
                id_column: str | None = None, root: str | None = None,
                collect=None, on_error=None) -> Source:
    """INPUT arguments -> one Source. Tables and tar shards are recognised by their suffix,
    folders are streamed, anything else (image files, list files, built-ins) goes through
    `collect(args) -> [(id, path)]`, the embed command's own reading of its inputs."""
    parts: list[Source] = []
    plain: list[str] = []

    def flush():
        if plain:
            parts.append(ItemsSource(collect(tuple(plain)) if collect else
                                     [(p, p) for p in plain], ",".join(plain)))
            plain.clear()

    for arg in inputs:
        lower = arg.lower()
        if os.path.isdir(arg):
            flush()
            parts.append(FolderSource(arg, on_error=on_error))
        elif os.path.isfile(arg) and lower.endswith(TABLE_SUFFIXES):
            flush()
            parts.append(TableSource(arg, column=column, id_column=id_column, root=root))
        elif lower.endswith(TAR_SUFFIXES) and os.path.exists(arg):  # a file or a pipe
            flush()
            parts.append(TarSource(arg))
        else:
            plain.append(arg)
    flush()
    return parts[0] if len(parts) == 1 else ChainSource(parts)
