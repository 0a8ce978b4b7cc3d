"""insightface ``.bin`` verification files: a pickle of (list of encoded images, list of bools).

Read with a restricted unpickler (never ``pickle.load``): only containers, bytes/str, numbers,
bools and numpy arrays/scalars are admitted, so a crafted ``evil.bin`` is refused, not executed.
It is Python's own pure-Python unpickler with every way to call or build something narrowed to
what a ``.bin`` needs, and every size checked against the file's before anything is allocated:
a crafted file can neither run code, nor crash numpy, nor ask for more memory than a few times its
length (the bytes its calls and array states create are counted against :data:`_ALLOC_FACTOR` x its
size, and images / issame entries that are references to one object are counted each time they occur).

Images ``2i`` and ``2i+1`` form pair ``i``. Files written under Python 2 need
``encoding='bytes'``; both kinds are read. :func:`sample_pairs` / :func:`make_pairs_bin` build a
pair list (half genuine, half impostor) from labelled images, e.g. held-out synthetic identities.
A malformed file raises :class:`~fr_dist.errors.DataFileError` (a ``ValueError``) naming it.
"""

from __future__ import annotations

import math
import os
import pickle
from pathlib import Path
from typing import Sequence

import numpy as np

from fr_dist.errors import BinUnpicklingError, DataFileError

__all__ = ["read_bin", "write_bin", "sample_pairs", "make_pairs_bin"]

_MA = (getattr(np, "_core", None) or np.core).multiarray
_LATIN1 = {"latin1", "latin-1", "iso-8859-1", "iso8859-1", "l1"}
_DTYPE_KINDS = "biufcOSU"  # bool, ints, floats, complex, object, bytes, str: no structured / void
_ALLOC_FACTOR, _ALLOC_SLACK = 4, 1 << 20
"""A .bin may create at most 4 x its size + 1 MiB of bytes through calls and array states (a real one
creates each image once: <= 2 x its size), and its images may add up to at most that (with a reference
counted each time it is listed): a memo reference costs 2 bytes of the file but can stand for megabytes."""


def _refuse(what: str):
    raise BinUnpicklingError(
        f"refused {what}: an insightface .bin holds only image bytes, bools and numpy arrays"
    )


def _text(s) -> str:
    return s.decode("latin-1") if isinstance(s, (bytes, bytearray)) else s


def _encode(obj, encoding="utf-8", errors="strict"):
    """``_codecs.encode``, as Python 3 writes ``bytes`` at protocol <= 2: a latin-1 str only."""
    if not isinstance(obj, str) or _text(encoding).lower() not in _LATIN1:
        _refuse(f"_codecs.encode of {type(obj).__name__} with encoding {encoding!r} (only latin-1 text)")
    return obj.encode("latin-1")


def _bytearray(*args):
    """``bytearray`` of bytes (protocol 3/4) or of latin-1 text (protocol 2); never of a length."""
    if not args:
        return bytearray()
    if isinstance(args[0], (bytes, bytearray)) and len(args) == 1:
        return bytearray(args[0])
    if isinstance(args[0], str) and len(args) == 2 and _text(args[1]).lower() in _LATIN1:
        return bytearray(args[0], "latin-1")
    _refuse(f"bytearray{tuple(type(a).__name__ for a in args)} (only of bytes or latin-1 text)")


def _dtype(obj, align=False, copy=False):
    """``numpy.dtype`` of a plain type code ('u1', 'b1', 'O8', ...): no fields, sub-arrays or voids."""
    if not isinstance(obj, (str, bytes)):
        _refuse(f"numpy.dtype({type(obj).__name__})")
    # always a copy (numpy writes copy=True): a BUILD that sets its byte order never touches the
    # process-wide dtype singletons
    dt = np.dtype(_text(obj), align=bool(align), copy=True)
    if dt.kind not in _DTYPE_KINDS or dt.fields is not None or dt.subdtype is not None:
        _refuse(f"numpy dtype {dt!r} (only plain bool / number / object / string types)")
    return dt


def _reconstruct(subtype, shape, typecode):
    """``numpy ... _reconstruct``: numpy writes an empty ``ndarray`` here and its data in the state."""
    if subtype is not np.ndarray or not isinstance(shape, tuple) or math.prod(_dims(shape)) != 0:
        _refuse(
            f"_reconstruct({getattr(subtype, '__name__', subtype)!r}, {shape!r}) (numpy writes an empty ndarray)"
        )
    return _MA._reconstruct(
        np.ndarray, shape, _dtype(typecode) if isinstance(typecode, (str, bytes)) else typecode
    )


def _scalar(dtype, obj=None):
    """``numpy ... scalar``: a numpy scalar from exactly ``itemsize`` bytes (an object one is ``obj``)."""
    if not isinstance(dtype, np.dtype):
        _refuse(f"numpy scalar of {type(dtype).__name__}")
    if dtype.hasobject:
        return obj
    data = obj.encode("latin-1") if isinstance(obj, str) else obj
    if not isinstance(data, bytes) or len(data) != dtype.itemsize:
        _refuse(f"numpy {dtype} scalar from {type(obj).__name__} (expected {dtype.itemsize} bytes)")
    return _MA.scalar(dtype, data)


def _dims(shape) -> list:
    if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        _refuse(f"array shape {shape!r}")
    return list(shape)


# The only globals an insightface .bin may name, each mapped to what the reader calls for it: numpy
# arrays / scalars / dtypes (issame as a numpy bool array, images as uint8 or object arrays in some
# community files) and ``_codecs.encode`` (how Python 3 writes ``bytes`` at pickle protocol <= 2).
# Both numpy 1 (numpy.core) and 2 (numpy._core); Python 2 module names (__builtin__) too.
_ALLOWED_GLOBALS = {
    ("_codecs", "encode"): _encode,
    ("builtins", "bytearray"): _bytearray,
    ("__builtin__", "bytearray"): _bytearray,
    ("numpy", "ndarray"): np.ndarray,  # only as _reconstruct's first argument, never called
    ("numpy", "dtype"): _dtype,
    ("numpy", "bool_"): np.bool_,
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy.core.multiarray", "scalar"): _scalar,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "scalar"): _scalar,
}
_CALLABLE = (_encode, _bytearray, _dtype, _reconstruct, _scalar, np.bool_)


def _resolve(module, name):
    """What a ``.bin`` may name: an entry of :data:`_ALLOWED_GLOBALS`, else BinUnpicklingError."""
    try:
        return _ALLOWED_GLOBALS[(module, name)]
    except (KeyError, TypeError):
        raise BinUnpicklingError(
            f"refused global {module}.{name}: an insightface .bin holds only image bytes, bools and "
            "numpy arrays (a crafted pickle can run code; this reader never imports anything else)"
        ) from None


class _BoundedReader:
    """A file whose reads never ask for more than is left of it (a bogus length allocates nothing)."""

    def __init__(self, f, size: int):
        self._f, self.left = f, size

    def read(self, n: int) -> bytes:
        if n > self.left:
            raise pickle.UnpicklingError(f"truncated: {n} bytes needed, {self.left} left in the file")
        b = self._f.read(n)
        self.left -= len(b)
        return b

    def readline(self) -> bytes:
        b = self._f.readline(self.left)
        self.left -= len(b)
        return b


class _BinUnpickler(pickle._Unpickler):
    """Python's pure-Python unpickler (a dict memo: no memo index can size an allocation), narrowed:

    * globals (GLOBAL, STACK_GLOBAL): only :data:`_ALLOWED_GLOBALS`, resolved here (nothing is
      imported; the base class's ``find_class`` is never reached);
    * REDUCE calls only the wrappers above; INST / OBJ / NEWOBJ(_EX) (which call a class) refused;
    * BUILD only on a numpy array (shape x dtype checked against the data it is given: numpy's own
      ``__setstate__`` does not check an object array's, and reads past the list) or a dtype
      (byte order only); BYTEARRAY8's length checked against what is left of the file.
    """

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, f, size: int, **kwargs):
        self._reader = _BoundedReader(f, size)
        self._budget = _ALLOC_FACTOR * size + _ALLOC_SLACK  # bytes the calls / states may still create
        super().__init__(self._reader, **kwargs)

    def _charge(self, nbytes: int, what: str) -> None:
        """Count ``nbytes`` created by ``what`` against the budget (copies of one memoized object add up)."""
        self._budget -= nbytes
        if self._budget < 0:
            raise pickle.UnpicklingError(
                f"{what} takes the bytes created past {_ALLOC_FACTOR} x the file's size + 1 MiB "
                "(references to one object copied again and again)"
            )

    def _global(self):  # GLOBAL: "module\nname\n"
        module = self.readline()[:-1].decode("utf-8")
        name = self.readline()[:-1].decode("utf-8")
        self.append(_resolve(module, name))

    def _stack_global(self):  # STACK_GLOBAL: module and name from the stack
        name, module = self.stack.pop(), self.stack.pop()
        self.append(_resolve(module, name))

    def persistent_load(self, pid):
        raise BinUnpicklingError(f"refused persistent id {pid!r}")

    def _reduce(self):
        args = self.stack.pop()
        func = self.stack[-1]
        if not any(func is f for f in _CALLABLE) or not isinstance(args, tuple):
            _refuse(f"call of {getattr(func, '__name__', type(func).__name__)}")
        if func is _encode or func is _bytearray:  # a copy of its argument: charge before making it
            self._charge(
                sum(len(a) for a in args[:1] if isinstance(a, (str, bytes, bytearray))), func.__name__
            )
        self.stack[-1] = func(*args)

    def _build(self):
        state = self.stack.pop()
        inst = self.stack[-1]
        if type(inst) is np.ndarray:
            self._charge(_check_array_state(state), "an array state")
            inst.__setstate__(state)
        elif isinstance(inst, np.dtype):
            want = inst.__reduce__()[2]
            ok = isinstance(state, tuple) and len(state) == len(want) and state[0] == want[0]
            if not (
                ok and tuple(map(_text, state[2:])) == want[2:] and _text(state[1]) in ("<", ">", "|", "=")
            ):
                _refuse(f"dtype state {state!r} for {inst!r} (only its byte order may differ)")
            if _text(state[1]) != want[1]:
                inst.__setstate__(state)
        else:
            _refuse(f"state of a {type(inst).__name__}")

    def _refused_opcode(self):
        _refuse("a pickle opcode that calls a class or names a registered extension (INST, OBJ, NEWOBJ, EXT)")

    def _bytearray8(self):
        n = int.from_bytes(self.read(8), "little")
        frame = self._unframer.current_frame  # protocol 4+: the data may sit in the frame read already
        left = self._reader.left + (len(frame.getbuffer()) - frame.tell() if frame else 0)
        if n > left:
            raise pickle.UnpicklingError(f"BYTEARRAY8 of {n} bytes but {left} bytes are left")
        self.append(bytearray(self.read(n)))

    dispatch[pickle.GLOBAL[0]] = _global
    dispatch[pickle.STACK_GLOBAL[0]] = _stack_global
    dispatch[pickle.REDUCE[0]] = _reduce
    dispatch[pickle.BUILD[0]] = _build
    dispatch[pickle.BYTEARRAY8[0]] = _bytearray8
    # INST / OBJ / NEWOBJ(_EX) call a class; EXT1/2/4 name a global through copyreg's registry
    for _op in (
        pickle.INST,
        pickle.OBJ,
        pickle.NEWOBJ,
        pickle.NEWOBJ_EX,
        pickle.EXT1,
        pickle.EXT2,
        pickle.EXT4,
    ):
        dispatch[_op[0]] = _refused_opcode
    del _op


def _check_array_state(state) -> int:
    """numpy ``ndarray.__setstate__`` arguments whose shape x dtype matches the data given; their bytes."""
    if not isinstance(state, tuple) or len(state) not in (4, 5):
        _refuse(f"ndarray state of {type(state).__name__}")
    shape, dtype, _, raw = state[-4:]
    if not isinstance(shape, tuple) or not isinstance(dtype, np.dtype):
        _refuse(f"ndarray state with shape {shape!r} and dtype {dtype!r}")
    n = math.prod(_dims(shape))
    if dtype.hasobject:
        if not (dtype.kind == "O" and isinstance(raw, list) and len(raw) == n):
            _refuse(f"object array of shape {shape} from {type(raw).__name__} of {_len(raw)} items")
    elif not (isinstance(raw, (bytes, bytearray, str)) and len(raw) == n * dtype.itemsize):
        _refuse(f"{dtype} array of shape {shape} from {_len(raw)} bytes (expected {n * dtype.itemsize})")
    return n * dtype.itemsize


def _len(x):
    return len(x) if isinstance(x, (bytes, bytearray, str, list, tuple)) else type(x).__name__


def _restricted_load(f, size: int, **kwargs):
    return _BinUnpickler(f, size, **kwargs).load()


def read_bin(path) -> tuple[list, list]:
    """(list of encoded image bytes, list of bool) with a clear error for anything else.

    The pickle is read by a restricted unpickler (:data:`_ALLOWED_GLOBALS`): a file naming any
    other class or function is refused before anything from it is called. Raises
    :class:`~fr_dist.errors.DataFileError` (a ``ValueError``) for a malformed or refused file.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            try:
                obj = _restricted_load(f, size)
            except UnicodeDecodeError:  # Python 2 `str` images: keep them as bytes
                f.seek(0)
                obj = _restricted_load(f, size, encoding="bytes")
    except FileNotFoundError:
        raise
    except BinUnpicklingError as e:
        raise DataFileError(f"{path}: not a safe insightface .bin pair file: {e}") from None
    except Exception as e:  # UnpicklingError, EOFError, ValueError, a bogus length's MemoryError...
        raise DataFileError(f"{path}: not an insightface .bin pair file ({type(e).__name__}: {e})") from None
    if not (isinstance(obj, (tuple, list)) and len(obj) == 2):
        raise DataFileError(
            f"{path}: not an insightface .bin pair file (expected a pickled (images, issame) pair, "
            f"got {type(obj).__name__})"
        )
    bins, issame = obj
    try:
        # entries one at a time, never np.asarray of the list: 100 references to one 1 MB bytes in
        # issame made a 100 MB string array
        if isinstance(issame, np.ndarray):
            issame = issame.reshape(-1).tolist()
        if not isinstance(issame, (list, tuple)):
            raise TypeError(f"issame must be a list or a numpy array, got {type(issame).__name__}")
        issame = [_issame(s) for s in issame]
        total = sum(_image_nbytes(b) for b in bins)  # before any copy: a reference counts each time
        if total > _ALLOC_FACTOR * size + _ALLOC_SLACK:
            raise ValueError(
                f"its {len(bins)} images add up to {total} bytes, more than {_ALLOC_FACTOR} x the file's "
                f"{size} (references to one image listed again and again)"
            )
        bins = [_image_bytes(b) for b in bins]
    except (TypeError, ValueError) as e:
        raise DataFileError(f"{path}: images must be byte strings and issame booleans ({e})") from None
    if len(bins) != 2 * len(issame):
        raise DataFileError(
            f"{path}: {len(bins)} images for {len(issame)} pairs (expected {2 * len(issame)})"
        )
    return bins, issame


def _issame(s) -> bool:
    """A pair's truth: a bool (Python or numpy) or the integer 0 / 1; nothing else is read as one."""
    if isinstance(s, bool) or (isinstance(s, int) and s in (0, 1)):
        return bool(s)
    raise TypeError(f"issame entries must be booleans (or 0 / 1), got {s!r:.40}")


def _image_nbytes(b) -> int:
    """Bytes that :func:`_image_bytes` returns for ``b`` (0 for what it refuses)."""
    if isinstance(b, (np.ndarray, memoryview)):
        return b.nbytes
    return len(b) if isinstance(b, (bytes, bytearray, str)) else 0


def _image_bytes(b) -> bytes:
    if isinstance(b, bytes):
        return b
    if isinstance(b, np.ndarray):  # a uint8 buffer of the encoded file
        if b.dtype != np.uint8:
            raise TypeError(f"an image stored as a numpy array must be uint8, got {b.dtype}")
        return b.tobytes()
    if isinstance(b, (bytearray, memoryview)):
        return bytes(b)
    if isinstance(b, str):  # Python 2 str decoded as latin-1
        return b.encode("latin-1")
    raise TypeError(f"image entries must be byte strings, got {type(b).__name__}")


def write_bin(path, images: Sequence[bytes], issame: Sequence[bool]) -> None:
    """Write an insightface ``.bin`` (pickle protocol 4, readable by insightface's loader)."""
    if len(images) != 2 * len(issame):
        raise ValueError(f"{len(images)} images for {len(issame)} pairs (expected {2 * len(issame)})")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(([bytes(b) for b in images], [bool(s) for s in issame]), f, protocol=4)


def sample_pairs(labels: Sequence[int], num_pairs: int, seed: int = 0) -> list[tuple[int, int, bool]]:
    """``num_pairs`` (i, j, same) image-index pairs: ceil(P/2) genuine, floor(P/2) impostor.

    Genuine pairs join two different images of an identity with >= 2 images; impostor pairs two
    different identities. The pair order is shuffled; deterministic from ``seed``.
    """
    labels = np.asarray(labels, dtype=np.int64)
    rng = np.random.default_rng([int(seed), 0xB1])
    by_id: dict[int, np.ndarray] = {}
    for c in np.unique(labels):
        by_id[int(c)] = np.flatnonzero(labels == c)
    ids = np.array(sorted(by_id))
    multi = np.array([c for c in ids if by_id[int(c)].size >= 2])
    n_same = (num_pairs + 1) // 2
    n_diff = num_pairs - n_same
    if n_same and multi.size == 0:
        raise ValueError("genuine pairs need an identity with at least 2 images")
    if n_diff and ids.size < 2:
        raise ValueError("impostor pairs need at least 2 identities")
    pairs = []
    for _ in range(n_same):
        c = int(rng.choice(multi))
        i, j = rng.choice(by_id[c], size=2, replace=False)
        pairs.append((int(i), int(j), True))
    for _ in range(n_diff):
        a, b = rng.choice(ids, size=2, replace=False)
        pairs.append((int(rng.choice(by_id[int(a)])), int(rng.choice(by_id[int(b)])), False))
    return [pairs[k] for k in rng.permutation(len(pairs))]


def make_pairs_bin(
    path, images: Sequence[bytes], labels: Sequence[int], num_pairs: int, seed: int = 0
) -> dict:
    """Write a ``.bin`` of ``num_pairs`` pairs drawn from labelled encoded images; returns counts."""
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    pairs = sample_pairs(labels, num_pairs, seed)
    bins, issame = [], []
    for i, j, same in pairs:
        bins += [images[i], images[j]]
        issame.append(same)
    write_bin(path, bins, issame)
    return {
        "path": str(path),
        "pairs": len(pairs),
        "same": int(sum(issame)),
        "diff": len(pairs) - int(sum(issame)),
    }
