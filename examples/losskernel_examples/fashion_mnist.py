"""Fashion-MNIST from local IDX files (Debian's ``dataset-fashion-mnist``), no downloads.

Debian and Ubuntu ship the dataset as a package::

    sudo apt-get install dataset-fashion-mnist
    # → /usr/share/datasets/fashion-mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz

:func:`load_fashion_mnist` reads those files (gzipped or not) with :func:`read_idx`, a small
reader of the IDX format of LeCun et al.: two zero bytes, a type code, the number of
dimensions, one big-endian uint32 per dimension, then the values in big-endian C order.
Nothing here touches the network; where the files are missing the error says how to get
them.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path
from typing import List, Optional, Tuple, Union

import numpy as np

__all__ = [
    "CLASS_NAMES",
    "DEBIAN_DIR",
    "ENV_VAR",
    "FashionMNISTNotFound",
    "find_fashion_mnist",
    "load_fashion_mnist",
    "read_idx",
    "write_idx",
]

#: where ``apt-get install dataset-fashion-mnist`` puts the four IDX files
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
#: a folder holding the IDX files, searched before the Debian one
ENV_VAR = "LOSSKERNEL_FASHION_MNIST_DIR"

CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
               "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")

_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

# IDX type code → big-endian numpy dtype
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"

PathLike = Union[str, os.PathLike]


class FashionMNISTNotFound(FileNotFoundError):
    """The Fashion-MNIST IDX files are not on this machine."""


def _read_bytes(path: Path) -> bytes:
    """The file's bytes, gunzipped if it is a gzip file (by content, not by name)."""
    raw = path.read_bytes()
    return gzip.decompress(raw) if raw[:2] == _GZIP_MAGIC else raw


def read_idx(path: PathLike) -> np.ndarray:
    """Read one IDX file (optionally gzipped) into a numpy array of its shape and type.

    Raises:
        ValueError: the file is not IDX (bad magic, unknown type code, truncated data).
    """
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path} is not an IDX file: it must start with two zero bytes")
    code, ndim = data[2], data[3]
    if code not in _IDX_DTYPES:
        raise ValueError(f"{path}: unknown IDX type code 0x{code:02x}")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path}: truncated IDX header ({len(data)} bytes for {ndim} dimensions)")
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = _IDX_DTYPES[code]
    count = int(np.prod(shape, dtype=np.int64)) if ndim else 1
    expected = header + count * dtype.itemsize
    if len(data) != expected:
        raise ValueError(f"{path}: IDX data of shape {shape} needs {expected} bytes, the file has {len(data)}")
    values = np.frombuffer(data, dtype=dtype, count=count, offset=header)
    return values.astype(dtype.newbyteorder("="), copy=True).reshape(shape)


def write_idx(path: PathLike, array: np.ndarray, compress: Optional[bool] = None) -> Path:
    """Write ``array`` as an IDX file (gzipped when ``compress`` or the name ends in .gz)."""
    path = Path(path)
    array = np.asarray(array)
    codes = {dt.newbyteorder("="): code for code, dt in _IDX_DTYPES.items()}
    native = array.dtype.newbyteorder("=")
    if native not in codes:
        raise ValueError(f"IDX cannot hold dtype {array.dtype}")
    body = (bytes([0, 0, codes[native], array.ndim])
            + np.asarray(array.shape, dtype=">u4").tobytes()
            + array.astype(array.dtype.newbyteorder(">")).tobytes())
    if compress if compress is not None else path.suffix == ".gz":
        body = gzip.compress(body)
    path.write_bytes(body)
    return path


def _candidate_dirs(root: Optional[PathLike]) -> List[Path]:
    if root is not None:
        return [Path(root)]
    dirs = []
    if os.environ.get(ENV_VAR):
        dirs.append(Path(os.environ[ENV_VAR]))
    dirs.append(DEBIAN_DIR)
    return dirs


def _find_file(folder: Path, stem: str) -> Optional[Path]:
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def find_fashion_mnist(root: Optional[PathLike] = None, split: str = "train") -> Tuple[Path, Path]:
    """Paths of the (images, labels) IDX files of ``split`` ("train" or "test").

    Searched: ``root`` if given; else ``$LOSSKERNEL_FASHION_MNIST_DIR``, then
    ``/usr/share/datasets/fashion-mnist`` (Debian's ``dataset-fashion-mnist``).

    Raises:
        FashionMNISTNotFound: with the folders searched and how to install the data.
    """
    if split not in _FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    searched = _candidate_dirs(root)
    for folder in searched:
        found = [_find_file(folder, stem) for stem in _FILES[split]]
        if all(found):
            return found[0], found[1]
    names = " and ".join(f"{stem}[.gz]" for stem in _FILES[split])
    raise FashionMNISTNotFound(
        f"Fashion-MNIST ({names}) not found in {', '.join(str(d) for d in searched)}. "
        "Install it without any download at run time from Debian/Ubuntu: "
        "`sudo apt-get install dataset-fashion-mnist` (puts the IDX files in "
        f"{DEBIAN_DIR}), or point ${ENV_VAR} (or root=) at a folder holding the four IDX "
        "files from https://github.com/zalandoresearch/fashion-mnist."
    )


def load_fashion_mnist(root: Optional[PathLike] = None, split: str = "train"
                       ) -> Tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST images uint8 [N, 28, 28] and labels int64 [N] from local IDX files.

    See :func:`find_fashion_mnist` for where the files are looked for; nothing is downloaded.
    """
    images_path, labels_path = find_fashion_mnist(root, split)
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise ValueError(f"unexpected Fashion-MNIST shapes: images {images.shape} ({images_path}), "
                         f"labels {labels.shape} ({labels_path})")
    return images, labels.astype(np.int64)
