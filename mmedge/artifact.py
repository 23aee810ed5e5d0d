"""An artifact folder on disk: its checked manifest, its verified files, and how one is written.

Reading: ``Artifact.open(path)`` parses manifest.json and resolves every file it names, refusing any
that would leave the folder (``..``, absolute paths, symlinks pointing outside). Component files are
hashed and compared with the manifest right before a session is created (``verified_path``), once per version of
the file on this device (``mmedge.file_checks``; ``recheck=True`` hashes every time).

Writing: ``atomic_folder(dest)`` hands out a temporary folder beside ``dest`` and renames it into
place only when the block finishes without error, so an interrupted export leaves no half-written
artifact and never touches an existing one until the new one is complete. ``--overwrite`` replaces only
what mmedge wrote (``check_output_folder``): never a file, a foreign folder, the current directory or the input;
the same rule is applied again at the rename to whatever appeared at ``dest`` while the work ran.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
import stat
import tempfile
import threading
from pathlib import Path
from typing import Callable, Iterable, Iterator

from mmedge import locks
from mmedge.errors import ArtifactError, ArtifactNotFoundError, IntegrityError, ManifestError, UnsafePathError
from mmedge.file_checks import CheckRecord, identity
from mmedge.manifest import FORMAT_NAME, MANIFEST_FILE, MAX_MANIFEST_BYTES, check_plain_file_name, parse_manifest

ENGINES_DIR = "engines"
ARTIFACT_KIND = "an mmedge artifact (a folder with mmedge's manifest.json)"  # what an export's --overwrite replaces
_CHUNK = 1 << 20


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def read_arrays(path: str | os.PathLike, what: str) -> dict:
    """Every array of an artifact's ``.npz`` (``what`` names it in the error: "validation samples"), no pickles; a
    file that does not read as one, whatever its sha256, is IntegrityError."""
    import zipfile

    import numpy as np

    try:
        with zipfile.ZipFile(path) as archive:  # an export writes its arrays uncompressed (np.savez): what they
            inflated = sum(info.file_size for info in archive.infolist())  # hold is at most the file's size
        if inflated > os.path.getsize(path):
            raise IntegrityError(f"{what} file '{Path(path).name}' inflates to {inflated:,} bytes from "
                                 f"{os.path.getsize(path):,} (compressed members: not an export's)",
                                 "an .npz written by `mmedge export` (its arrays stored uncompressed)",
                                 "re-export the artifact; do not run an artifact from a source you do not trust")
        with np.load(path, allow_pickle=False) as data:
            return {key: data[key] for key in data.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise IntegrityError(f"{what} file '{Path(path).name}' is unreadable ({type(exc).__name__}: {exc})",
                             "an .npz written by `mmedge export`", "re-export the artifact") from None


def check_weight_files(name: str, path: Path, external: dict | None) -> None:
    """A graph names its own external weight files: each must be the one its manifest entry names and hashes. A
    graph from someone else, its hashes made to match, could name /etc/passwd or ``../`` (ONNX Runtime before 1.24
    read them, and an output can return what it read) or an unhashed file beside it. A graph this walk cannot read is
    refused too (ONNX Runtime refuses a broken one; a walk that gave up would let any reference through)."""
    from mmedge.graph_refs import MalformedGraph, external_locations

    try:
        locations = external_locations(path)
    except (MalformedGraph, OSError, ValueError) as exc:
        raise IntegrityError(f"mmedge could not load component '{name}' from '{path.name}' (not an ONNX protobuf: "
                             f"{exc})", "a graph written by `mmedge export`",
                             "re-export the artifact, or copy the file again") from None
    stray = sorted(locations - ({external["file"]} if external else set()))
    if stray:
        raise UnsafePathError(f"the graph of component '{name}' ('{path.name}') reads weights from "
                              f"'{stray[0][:200]}', a file its manifest entry does not name and hash",
                              f"weights inside the graph, or in the one file components.{name}.external_data names",
                              "do not run this artifact: re-export it from its checkpoint, or get it again from a "
                              "source you trust")


def check_engines_folder(root: Path) -> None:
    """engines/ is this device's cache, written and pruned by mmedge: a symlink there (shipped with an artifact, or
    made by hand) would have mmedge write its records and compiled models into, and remove its stale temporary files
    from, a folder the link names, wherever it is. Refused; without engines/, an artifact on read-only storage runs
    uncached."""
    engines = root / ENGINES_DIR
    if engines.is_symlink():
        raise UnsafePathError(f"the artifact's {ENGINES_DIR}/ is a symbolic link (to '{os.readlink(engines)}')",
                              f"{ENGINES_DIR}/ a folder inside the artifact, made by mmedge on this device (it is "
                              "never shipped)", f"delete the link '{engines}' (mmedge makes the folder again), or copy "
                              "the artifact without it")


class Artifact:
    """A parsed, path-checked artifact folder. Cheap to open; files are hashed lazily, once."""

    def __init__(self, root: Path, manifest: dict, *, recheck: bool = False, record: bool = True):
        self.root = root
        self.manifest = manifest
        self.recheck = recheck  # hash every file, whatever this device's record of earlier checks says
        self._verified: set[str] = set()
        self._lock = threading.Lock()
        self._checks = CheckRecord(root / ENGINES_DIR) if record else None  # None: no record read or written

    @classmethod
    def open(cls, path: str | os.PathLike, *, recheck: bool = False) -> "Artifact":
        if not isinstance(path, (str, os.PathLike)):
            raise ArtifactNotFoundError(f"the artifact path is a {type(path).__name__}",
                                        "the path of an artifact folder (str or pathlib.Path)",
                                        "pass the folder's path")
        root = Path(path)
        if not root.is_dir():
            what = "is a file, not an artifact folder" if root.exists() else "does not exist"
            raise ArtifactNotFoundError(
                f"artifact folder '{root}' {what}",
                "a folder written by `mmedge export` that holds manifest.json",
                "check the path, or export one with `mmedge export MODEL OUT`",
            )
        manifest_path = root / MANIFEST_FILE
        if not manifest_path.is_file():
            raise ArtifactNotFoundError(
                f"'{root}' has no {MANIFEST_FILE}" + (" file (it is a folder)" if manifest_path.is_dir() else ""),
                "an artifact folder written by `mmedge export`",
                "point at the folder `mmedge export` wrote, or re-export",
            )
        try:
            with open(manifest_path, "rb") as handle:
                text = handle.read(MAX_MANIFEST_BYTES + 1)  # parse_manifest refuses anything longer
        except OSError as exc:
            raise ArtifactError(f"cannot read '{manifest_path}' ({exc.strerror})", "a readable file",
                                "check the file's permissions") from None
        try:
            manifest = parse_manifest(text)
        except ManifestError as error:  # named with its folder: a command may take several artifacts
            raise type(error)(f"artifact '{root}': {error.what}", error.expected, error.fix) from None
        check_engines_folder(root.resolve())
        artifact = cls(root.resolve(), manifest, recheck=recheck)
        for field, name in artifact.named_files():
            artifact.resolve_file(name, field)
        return artifact

    # --- manifest views ----------------------------------------------------------------------
    @property
    def family(self) -> str:
        return self.manifest["family"]

    @property
    def components(self) -> dict[str, dict]:
        return self.manifest["components"]

    @property
    def random_weights(self) -> bool:
        return bool(self.manifest["source"]["random_weights"])

    def component(self, name: str) -> dict:
        if name not in self.components:
            raise ArtifactError(
                f"artifact '{self.root.name}' has no component '{name}'",
                f"one of {', '.join(self.components)}",
                "export the artifact with the task that needs this component",
            )
        return self.components[name]

    def named_files(self) -> list[tuple[str, str]]:
        """(manifest field, file name) for every file the manifest names."""
        files = [(f"components.{n}.file", c["file"]) for n, c in self.components.items()]
        files += [(f"components.{n}.external_data.file", c["external_data"]["file"])
                  for n, c in self.components.items() if c.get("external_data")]
        for key in ("tokenizer", "validation"):
            if self.manifest.get(key):
                files.append((f"{key}.file", self.manifest[key]["file"]))
        family = self.manifest.get("family")
        embeddings = (self.manifest.get(family) or {}).get("embeddings") if isinstance(family, str) else None
        if embeddings:
            files.append((f"{family}.embeddings.file", embeddings["file"]))
        return files

    # --- files --------------------------------------------------------------------------------
    def resolve_file(self, name: str, field: str, folder: str | None = None) -> Path:
        """The path of a file the manifest names, refusing anything that resolves outside the folder
        (``folder``: a plain subfolder name, e.g. the ``pytorch`` weights' folder)."""
        check_plain_file_name(name, field)
        base = self.root
        if folder is not None:
            check_plain_file_name(folder, f"{field} (folder)")
            base = (self.root / folder).resolve()
            if base.parent != self.root:
                raise UnsafePathError(
                    f"manifest.json field '{field}' names the folder '{folder}', which resolves outside the "
                    "artifact folder",
                    "a real subfolder of the artifact folder",
                    "re-export the artifact, or copy the real folder into it")
        path = base / name
        shown = _relative_name(name, folder)
        try:
            real = path.resolve()
            is_file = real.is_file()
        except OSError as exc:
            raise ArtifactError(
                f"cannot access artifact file '{shown}' (manifest field '{field}'): {exc.strerror or exc}",
                "a readable regular file inside the artifact folder",
                "check the folder's permissions, or copy the artifact again",
            ) from None
        if real.parent != base:
            raise UnsafePathError(
                f"manifest.json field '{field}' names '{name}', which resolves to '{real}', outside the "
                "artifact folder",
                "a regular file inside the artifact folder (symlinks out of the folder are refused)",
                "re-export the artifact, or copy the real file into the folder",
            )
        if not is_file:
            raise ArtifactNotFoundError(
                f"artifact file '{shown}' (manifest field '{field}') is missing from '{self.root}'",
                "every file the manifest names to be present",
                "copy the whole artifact folder again, or re-export it",
            )
        return real

    def verified_path(self, name: str, sha256: str, field: str, folder: str | None = None) -> Path:
        """Resolve a file and check its sha256 against the manifest: once per Artifact object, and once per version
        of the file on this device unless ``recheck`` (``mmedge.file_checks``)."""
        path = self.resolve_file(name, field, folder)
        key = _relative_name(name, folder)
        with self._lock:
            if key in self._verified:
                return path
        try:
            before = identity(path)
            recorded = self._checks is not None and not self.recheck and self._checks.matches(key, sha256, before)
            actual = sha256 if recorded else sha256_file(path)  # recorded: this version of the file matched before
        except OSError as exc:
            raise ArtifactError(f"cannot read artifact file '{key}' ({exc.strerror or exc})", "a readable file",
                                "check the file's permissions, or copy the artifact again") from None
        if actual != sha256 and path.stat().st_size == 0:
            raise IntegrityError(
                f"artifact file '{key}' in '{self.root}' is empty (0 bytes), but the manifest records sha256 "
                f"{sha256[:12]}…",
                "the file exactly as `mmedge export` wrote it",
                "the copy was interrupted or the disk filled up: copy the artifact again or re-export it",
            )
        if actual != sha256:
            raise IntegrityError(
                f"artifact file '{key}' in '{self.root}' has sha256 {actual[:12]}…, but the manifest records "
                f"{sha256[:12]}…",
                "the file exactly as `mmedge export` wrote it",
                "the file is corrupt or was replaced: copy the artifact again or re-export it",
            )
        with contextlib.suppress(OSError):
            if self._checks and not recorded and identity(path) == before:  # unchanged while it was read
                self._checks.remember(key, sha256, before)
        with self._lock:
            self._verified.add(key)
        return path

    def component_path(self, name: str) -> Path:
        """The component's graph, its sha256 (and that of its external weight file) checked, and the weight files the
        graph itself names checked against its manifest entry (``check_weight_files``)."""
        comp = self.component(name)
        external = comp.get("external_data")
        if external:
            self.verified_path(external["file"], external["sha256"], f"components.{name}.external_data.file")
        path = self.verified_path(comp["file"], comp["sha256"], f"components.{name}.file")
        check_weight_files(name, path, external)
        return path

    @property
    def has_pytorch_weights(self) -> bool:
        """Whether the manifest names PyTorch weights (``export --with-pytorch``) and their folder is here."""
        entry = self.manifest.get("pytorch")
        return bool(entry) and (self.root / entry["folder"]).is_dir()

    def pytorch_folder(self) -> Path:
        """The folder of the checkpoint's safetensors weights and config.json, every file's sha256 checked
        (once per Artifact object); for the torch backend."""
        entry = self.manifest.get("pytorch")
        if not entry:
            raise ArtifactNotFoundError(
                f"artifact '{self.root.name}' holds no PyTorch weights",
                "an artifact exported with `mmedge export --with-pytorch` (its pytorch/ folder of safetensors weights)",
                "re-export with --with-pytorch, or pass the torch backend a checkpoint folder (checkpoint=...)")
        folder = entry["folder"]
        if not (self.root / folder).is_dir():
            raise ArtifactNotFoundError(
                f"the PyTorch weights' folder '{folder}' is missing from '{self.root}'",
                "the folder the manifest's 'pytorch' entry names",
                "copy the whole artifact folder again, or re-export it")
        for name, info in entry["files"].items():
            self.verified_path(name, info["sha256"], f"pytorch.files.{name}", folder)
        return self.root / folder

    def check_every_file(self) -> None:
        """Check the sha256 of every file the manifest names with one (graphs, their weights, tokenizers, embedding
        tables, validation samples, backend-specific weights such as OpenVINO's, the pytorch/ folder when it is here),
        not only those a plan opens. ``mmedge validate`` runs it."""
        entries = _hashed_entries(self.manifest)
        for field, entry in entries:
            self.verified_path(entry["file"], entry["sha256"], f"{field}.file")
        pytorch = self.manifest.get("pytorch") or {}
        if pytorch and (self.root / pytorch["folder"]).is_dir():  # without it the torch backend is only unavailable
            self.pytorch_folder()

    @property
    def engines_path(self) -> Path:
        """Where the device-local cache (``engines/``) lies, made or not: for a cache that is optional and makes the
        folder itself when it stores (OpenVINO's compiled models), so a read-only artifact still loads."""
        return self.root / ENGINES_DIR

    def engines_dir(self) -> Path:
        """Device-local cache (TensorRT plans, ORT engine caches), made if missing; never shipped."""
        path = self.engines_path
        try:
            path.mkdir(exist_ok=True)
        except FileExistsError:
            raise ArtifactError(f"'{path}' is a file, not the artifact's engines/ folder",
                                "engines/ as a folder (this device's cache of compiled models and timings)",
                                f"move or delete '{path}'; mmedge makes the folder again") from None
        except OSError as exc:
            raise ArtifactError(f"cannot make '{path}' ({exc.strerror or exc})",
                                "a writable artifact folder (engines/ caches what this device compiles)",
                                "check the folder's permissions, or copy the artifact to a writable place") from None
        return path

    def size_bytes(self) -> int:
        """Bytes of what the artifact carries: every file the manifest names (graphs and their weights, tokenizer,
        embedding table, validation samples, OpenVINO IRs) and pytorch/ when it is here; not engines/ (this device's
        cache)."""
        files = dict((name, field) for field, name in self.named_files())
        files.update((entry["file"], f"{field}.file") for field, entry in _hashed_entries(self.manifest))
        total = sum(self.resolve_file(name, field).stat().st_size for name, field in files.items())
        pytorch = self.manifest.get("pytorch") or {}
        folder = self.root / pytorch["folder"] if pytorch else None
        if folder is not None and folder.is_dir():
            total += sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        return total


def _relative_name(name: str, folder: str | None) -> str:
    """A file's path relative to the artifact folder, as messages name it: ``pytorch/config.json``."""
    return name if folder is None else f"{folder}/{name}"


def _hashed_entries(node, field: str = "") -> list[tuple[str, dict]]:
    """(manifest field, entry) for every object in the manifest with a ``file`` and its ``sha256``, at any depth
    (``components.decoder.openvino.int4.weights_file``): what a check of every file reads."""
    found = []
    if isinstance(node, dict):
        if isinstance(node.get("file"), str) and isinstance(node.get("sha256"), str):
            found.append((field, node))
        for key, value in node.items():
            found += _hashed_entries(value, f"{field}.{key}" if field else key)
    elif isinstance(node, list):
        for index, value in enumerate(node):
            found += _hashed_entries(value, f"{field}[{index}]")
    return found


def _remove_abandoned_staging(parent: Path, name: str) -> None:
    """Staging folders of exports that were killed are removed. A live export holds a lock on its staging folder
    (``_make_staging``) until it is renamed into place, and the kernel drops the lock when the export dies: a folder
    whose lock can be taken is abandoned, whatever its PID names (another container's PID namespace shares the
    volume, and a PID is reused). Its scratch folders (``.NAME.partial-PID-scratch-*``, no lock of their own) go
    with it: kept while a locked staging folder of that PID remains. Where the OS has no locks, the PID decides."""
    prefix = f".{name}.partial-"
    folders = sorted(parent.glob(f"{prefix}*"))
    live, abandoned = set(), []
    for folder in folders:
        pid = folder.name[len(prefix):].split("-", 1)[0]
        if "-scratch-" in folder.name or not folder.is_dir() or folder.is_symlink():
            continue
        if locks.fcntl is None:  # no locks here: the PID is all there is to go by
            if pid.isdigit() and not _process_alive(int(pid)):
                abandoned.append((folder, None))
            else:
                live.add(pid)
            continue
        try:
            handle = os.open(folder, os.O_RDONLY)
        except OSError:
            live.add(pid)
            continue
        if locks.hold(handle, wait=False):  # held until it is removed: an export making it waits, then sees it gone
            abandoned.append((folder, handle))
        else:
            live.add(pid)
            os.close(handle)
    for folder in folders:
        pid = folder.name[len(prefix):].split("-", 1)[0]
        if "-scratch-" in folder.name and pid not in live:
            shutil.rmtree(folder, ignore_errors=True)
    for folder, handle in abandoned:
        shutil.rmtree(folder, ignore_errors=True)
        if handle is not None:
            os.close(handle)


def _make_staging(parent: Path, name: str) -> tuple[Path, int | None]:
    """An empty staging folder in ``parent`` (``.NAME.partial-PID-`` and mkdtemp's 8 random characters) and an open
    handle holding its lock (None where the OS has no locks): close it once the folder is renamed into place or
    removed. A folder that another export's ``_remove_abandoned_staging`` took for abandoned in the instant before it
    was locked is gone once the lock is ours: then another is made."""
    while True:
        staging = Path(tempfile.mkdtemp(prefix=f".{name}.partial-{os.getpid()}-", dir=parent))
        if locks.fcntl is None:
            return staging, None
        try:
            handle = os.open(staging, os.O_RDONLY)
        except FileNotFoundError:
            continue
        if locks.hold_new(handle, staging):
            return staging, handle
        os.close(handle)


def _process_alive(pid: int) -> bool:
    """A hint only (``_remove_abandoned_staging`` where the OS has no locks): a PID says nothing across PID namespaces
    or after its reuse."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _umask() -> int:
    """The process's umask, read without changing it where the kernel shows it (Linux 4.7+: ``Umask:`` in
    /proc/self/status). Setting it to read it back (the fallback) changes it for every thread meanwhile: a file
    another thread creates in that moment would be made with no umask at all."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


def export_needed(folder: str | os.PathLike, model: str, precision: str,
                  llm_precision: str | None = None) -> str | None:
    """Why ``folder`` must be exported (again) from ``model`` at ``precision`` (the decoder at ``llm_precision``,
    as ``mmedge export`` takes them); None when its manifest says it already was. For scripts that keep an artifact
    between runs and take options that change it (an option the kept artifact ignores would change nothing)."""
    folder = Path(folder)
    if not (folder / MANIFEST_FILE).is_file():
        return f"there is no artifact in {folder} yet"
    manifest = Artifact.open(folder).manifest
    source, made = manifest["source"]["model"], {n: c["precision"] for n, c in manifest["components"].items()}
    wanted = {name: (llm_precision or precision) if name == "decoder" else precision for name in made}
    # a local folder is recorded by its resolved path (mmedge.export.loading.recorded_source): 'm/clip', './m/clip/'
    # and the absolute path are one checkpoint. An older artifact's relative path is never taken for a match: from
    # another directory it names another folder.
    if source == (str(Path(model).resolve()) if os.path.exists(model) else model) and made == wanted:
        return None
    return f"{folder} held {source} at " + ", ".join(f"{name} {precision}" for name, precision in made.items())


def is_artifact_folder(path: Path) -> bool:
    """Whether ``path`` holds an mmedge artifact's manifest (``format``: ``mmedge.artifact``), however damaged the rest
    of the folder is: what ``--overwrite`` of an export may replace. A web app's manifest.json is not one."""
    try:
        with open(path / MANIFEST_FILE, "rb") as handle:
            manifest = json.loads(handle.read(MAX_MANIFEST_BYTES + 1))
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and manifest.get("format") == FORMAT_NAME


def write_whole(path: Path, data: bytes, mode: int = 0o666) -> None:
    """Write ``data`` to ``path`` whole or not at all: into a temporary file beside it, flushed to disk, then renamed
    over it (a reader sees the old file or the new one, never half of one; a killed process leaves ``path`` as it
    was). ``mode``: the new file's permissions before the umask, as a plain write makes it (so other users of a
    shared cache can read it). The writer holds a lock on its temporary file (``temporary_path``) until it is
    renamed: one that a killed writer left, ``mmedge.locks.remove_abandoned_temporaries`` removes."""
    while True:
        temporary = temporary_path(path)
        handle = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)  # os.open applies the umask
        if locks.hold_new(handle, temporary):
            break
        os.close(handle)  # swept as abandoned before it was locked
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
            if locks.fcntl is not None:  # renamed while still locked (Windows renames no open file)
                os.replace(temporary, path)
        if locks.fcntl is None:
            os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def temporary_path(path: Path) -> Path:
    """A new temporary file's name beside ``path``: ``.<name>.<pid>-<8 hex>.tmp``, hidden, unique, and known to
    ``mmedge.locks.remove_abandoned_temporaries``."""
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}{locks.TEMPORARY_SUFFIX}")


NAME_MAX_BYTES = 255  # a file name's limit on Linux file systems (ext4, xfs, btrfs), and macOS's
# atomic_folder's staging folder beside the output: mkdtemp's name ".NAME.partial-PID-" and 8 random characters, with
# a PID of up to 7 digits
STAGING_EXTRA_BYTES = len(".") + len(".partial-") + len(str(2 ** 22)) + len("-") + 8


def check_output_folder(dest: str | os.PathLike, *, overwrite: bool,
                        recognize: Callable[[Path], bool] = is_artifact_folder, kind: str = ARTIFACT_KIND,
                        command: str = "mmedge export", sources: Iterable[str | os.PathLike] = ()) -> None:
    """Refuse, before any work, an output path this write must not take: one that exists without ``overwrite``, and
    with it anything ``--overwrite`` would destroy that the tool did not write (a file, a folder ``recognize`` does
    not know and that is not empty, the current directory or one above it, a folder holding one of ``sources``:
    the checkpoint or artifacts being read); and one that cannot be written (``_check_writable``: its folder is not a
    writable folder and cannot be made one, or its name leaves the staging folder no room), as the write would
    otherwise fail only after all the work."""
    dest = Path(dest)
    if not os.path.lexists(dest):
        _check_writable(dest)
        return
    if not overwrite:
        raise ArtifactError(f"output folder '{dest}' already exists", "a path that does not exist yet",
                            "choose another output path, or pass --overwrite to replace it once the new "
                            f"{'export' if command == 'mmedge export' else 'one'} is complete")
    replaceable = f"with --overwrite, a folder `{command}` wrote, an empty folder, or a path that does not exist yet"
    if not dest.is_dir():
        what = "a file" if dest.exists() else "a broken symbolic link"
        raise ArtifactError(f"output path '{dest}' is {what}, not a folder, so --overwrite will not replace it",
                            replaceable, "choose another output path, or remove it yourself if it is not needed")
    real, cwd = dest.resolve(), Path.cwd().resolve()
    if real == cwd or real in cwd.parents:  # renaming it away would fail after all the work, or strand the shell
        raise ArtifactError(f"output folder '{dest}' is the current directory or one above it",
                            "an output folder outside the current directory's path",
                            "pass a new subfolder as the output, e.g. ./out")
    for source in sources:
        source = Path(source)
        if source.exists() and (source.resolve() == real or real in source.resolve().parents):
            raise ArtifactError(f"output folder '{dest}' is or holds '{source}', which `{command}` reads: "
                                "--overwrite would delete it", "an output folder apart from what it reads",
                                "choose another output path")
    if not recognize(dest) and any(dest.iterdir()):
        raise ArtifactError(f"output folder '{dest}' is not empty and is not {kind}, so --overwrite will not "
                            "replace it", replaceable,
                            "choose another output path, or remove the folder yourself if nothing in it is needed")
    _check_writable(dest)


def _check_writable(dest: Path) -> None:
    """Refuse ``dest`` when the folder it goes into is not a folder, or neither it nor (where it is still to be
    created) its nearest existing ancestor can be written, or its name is too long for the staging folder's: the
    staging folder is made there and renamed to ``dest``. A path ending in '..' (or naming no folder at all) is refused:
    its staging folder would be named after '..', and renaming it there fails only after all the work."""
    if dest.name in ("", ".", ".."):
        raise ArtifactError(f"output path '{dest}' ends in '{dest.name or '.'}', so it names no new folder",
                            "an output path whose last part is the folder's own name (not '.' or '..')",
                            "write the folder's name at the end, e.g. 'artifacts/clip-int8'")
    size = len(dest.name.encode())
    if size + STAGING_EXTRA_BYTES > NAME_MAX_BYTES:
        raise ArtifactError(f"output path '{dest}' has a name of {size} bytes",
                            f"a name of at most {NAME_MAX_BYTES - STAGING_EXTRA_BYTES} bytes (the output is written "
                            f"as '.NAME.partial-…' beside it first, and file names stop at {NAME_MAX_BYTES} bytes)",
                            "choose a shorter output name")
    parent = dest.parent if str(dest.parent) else Path(".")
    existing = parent
    while not os.path.lexists(existing) and existing != existing.parent:
        existing = existing.parent
    where = "its folder" if existing == parent else "the nearest existing folder above it"
    expected = "an output path in a folder you can write (or one that can be created)"
    if not existing.is_dir():
        what = "a file" if existing.exists() else "a broken symbolic link"
        raise ArtifactError(f"output path '{dest}' cannot be written: '{existing}' is {what}, not a folder",
                            expected, "choose another output path")
    if not os.access(existing, os.W_OK | os.X_OK):  # also False for root on a read-only file system
        raise ArtifactError(f"output path '{dest}' cannot be written: {where}, '{existing}', is not writable",
                            expected, "choose an output path in a writable folder, or fix the folder's permissions")


def _missing_folders(folder: Path) -> list[Path]:
    """``folder`` and those above it that do not exist yet, deepest first: what ``mkdir(parents=True)`` creates."""
    missing = []
    while not os.path.lexists(folder) and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing


@contextlib.contextmanager
def atomic_folder(dest: str | os.PathLike, *, overwrite: bool = False,
                  recognize: Callable[[Path], bool] = is_artifact_folder,
                  kind: str = ARTIFACT_KIND, command: str = "mmedge export",
                  sources: Iterable[str | os.PathLike] = ()) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``dest``; on success it becomes ``dest``.

    ``dest`` is checked first (``check_output_folder``: with ``overwrite`` only what ``recognize`` knows, or an empty
    folder, is replaced). On any exception (or a killed process) the temporary folder is removed or left as a hidden
    ``.dest.partial-*`` folder, ``dest`` itself is untouched, and the parent folders this created are removed again.
    At the rename the same rule is applied again to whatever is at ``dest`` by then (``_move_into_place``).
    """
    dest, sources = Path(dest), list(sources)  # sources: read at the start and again at the rename
    check_output_folder(dest, overwrite=overwrite, recognize=recognize, kind=kind, command=command, sources=sources)
    parent = dest.parent if str(dest.parent) else Path(".")
    created = _missing_folders(parent)
    try:
        parent.mkdir(parents=True, exist_ok=True)
        _remove_abandoned_staging(parent, dest.name)
        staging, held = _make_staging(parent, dest.name)
    except BaseException:
        _remove_empty(created)
        raise
    try:
        yield staging
        mask = _umask()
        staging.chmod(0o777 & ~mask)  # mkdtemp (and some writers) make things private; an artifact is ordinary
        for item in staging.rglob("*"):  # pytorch/ too: transformers' save_pretrained writes its weights 0600
            if item.is_symlink():
                continue
            status = item.lstat()
            if item.is_file() and status.st_nlink > 1:
                continue  # hard-linked in (`mmedge triton`): the mode is its artifact's file's, not this write's
            mode = (0o666 if item.is_file() else 0o777) & ~mask
            if stat.S_IMODE(status.st_mode) != mode:  # a chmod that changes nothing still moves the change time
                item.chmod(mode)
        _move_into_place(staging, dest, overwrite=overwrite, recognize=recognize, kind=kind, command=command,
                         sources=sources)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        _remove_empty(created)  # a refused export leaves nothing new on disk
        raise
    finally:
        if held is not None:
            os.close(held)  # the staging folder's lock (_make_staging), held until it was renamed or removed


def _move_into_place(staging: Path, dest: Path, *, overwrite: bool, command: str, **replacing) -> None:
    """Rename the finished ``staging`` to ``dest``. What lies at ``dest`` now is judged again by the start's rule
    (``check_output_folder``): another export, or the user, may have put something there while this one ran. Without
    ``overwrite`` nothing is replaced; with it only what the start would have replaced, and the old folder is put back
    if the new one cannot take its place."""
    if not os.path.lexists(dest):
        try:
            os.rename(staging, dest)
            return
        except OSError:  # something made there since the check above (a folder that is not empty): never replaced
            if not os.path.lexists(dest):
                raise
    if not overwrite:  # the start found nothing there (check_output_folder refuses an existing dest without it)
        raise _appeared(dest, command)
    check_output_folder(dest, overwrite=True, command=command, **replacing)
    parent = dest.parent if str(dest.parent) else Path(".")
    backup = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=parent))
    os.replace(dest, backup / "old")
    try:
        os.replace(staging, dest)
    except BaseException:
        os.replace(backup / "old", dest)  # the old artifact back where it was, not left in a hidden folder
        backup.rmdir()
        raise
    shutil.rmtree(backup, ignore_errors=True)


def _appeared(dest: Path, command: str) -> ArtifactError:
    return ArtifactError(f"output folder '{dest}' appeared while `{command}` was writing (another run, or a folder "
                         "made there meanwhile): it was left as it is and nothing was written",
                         "a path that does not exist yet (without --overwrite nothing is replaced)",
                         "choose another output path, or pass --overwrite to replace it when it is one mmedge wrote")


def _remove_empty(folders: list[Path]) -> None:
    """Remove ``folders`` (deepest first) while they are empty: another process may have put something there."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


__all__ = ["Artifact", "atomic_folder", "check_output_folder", "is_artifact_folder", "sha256_file", "ENGINES_DIR",
           "UnsafePathError"]
