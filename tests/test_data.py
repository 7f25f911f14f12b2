from pathlib import Path

import numpy as np
import pytest

from splitkd.data import edge_split, load_dataset, parse_shard
from splitkd.data.partition import Shard, cloud_split, presumed_split, shard_indices
from splitkd.data.specs import DataError


def test_digits_is_the_embedded_image_dataset() -> None:
    data = load_dataset("digits")
    assert data.x.shape == (1797, 1, 8, 8)
    assert data.signature.input_shape == (1, 8, 8)
    assert data.signature.num_classes == 10
    assert data.x.min() >= 0.0 and data.x.max() <= 1.0


def test_npz_and_csv_load_with_class_count_from_the_whole_file(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((50, 6)), rng.integers(0, 3, 50)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    data = load_dataset(f"npz:{tmp_path / 'd.npz'}")
    assert data.signature.input_shape == (6,) and data.signature.num_classes == 3
    rows = "\n".join(",".join(map(str, [*r, int(c)])) for r, c in zip(x, y, strict=True))
    (tmp_path / "d.csv").write_text("a,b,c,d,e,f,label\n" + rows + "\n")
    table = load_dataset(f"csv:{tmp_path / 'd.csv'}")
    np.testing.assert_allclose(table.x, data.x, rtol=1e-6)
    np.testing.assert_array_equal(table.y, data.y)


@pytest.mark.parametrize(
    "spec,message",
    [
        ("mnist", "unknown data spec"),
        ("npz:/nonexistent.npz", "does not exist"),
        ("csv:", "unknown data spec"),
    ],
)
def test_bad_specs_say_why(spec: str, message: str) -> None:
    with pytest.raises(DataError, match=message):
        load_dataset(spec)


def test_bad_files_say_why(tmp_path: Path) -> None:
    np.savez(tmp_path / "noy.npz", x=np.zeros((20, 2)))
    with pytest.raises(DataError, match="needs arrays 'x' and 'y'"):
        load_dataset(f"npz:{tmp_path / 'noy.npz'}")
    np.savez(tmp_path / "neg.npz", x=np.zeros((20, 2)), y=-np.ones(20))
    with pytest.raises(DataError, match=r"0\.\.K-1"):
        load_dataset(f"npz:{tmp_path / 'neg.npz'}")
    np.savez(tmp_path / "nan.npz", x=np.full((20, 2), np.nan), y=np.zeros(20))
    with pytest.raises(DataError, match="NaN"):
        load_dataset(f"npz:{tmp_path / 'nan.npz'}")
    (tmp_path / "bad.csv").write_text("1,2,0\n1,x,1\n")
    with pytest.raises(DataError, match="non-numeric"):
        load_dataset(f"csv:{tmp_path / 'bad.csv'}")
    (tmp_path / "pickle.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="not a readable npz"):
        load_dataset(f"npz:{tmp_path / 'pickle.npz'}")


def test_object_arrays_are_never_unpickled(tmp_path: Path) -> None:
    x = np.empty(20, dtype=object)
    x[:] = [{"a": i} for i in range(20)]
    np.savez(tmp_path / "obj.npz", x=x, y=np.zeros(20))
    with pytest.raises(DataError, match="not a readable npz"):
        load_dataset(f"npz:{tmp_path / 'obj.npz'}")


@pytest.mark.parametrize("text", ["1", "a/b", "2/2", "-1/2", "0/0"])
def test_bad_shards_are_refused(text: str) -> None:
    with pytest.raises(DataError):
        parse_shard(text)


def test_partition_is_deterministic_and_disjoint() -> None:
    data = load_dataset("digits")
    cloud, pool = presumed_split(len(data), 0.4)
    assert not set(cloud) & set(pool) and len(cloud) + len(pool) == len(data)
    splits = [edge_split(data, Shard(i, 3)) for i in range(3)]
    again = edge_split(data, Shard(1, 3))
    np.testing.assert_array_equal(again.train.x, splits[1].train.x)
    seen: set[bytes] = set()
    for split in splits:
        for part in (split.train, split.heldout):
            keys = {row.tobytes() for row in part.x}
            assert not keys & seen  # an edge's samples appear nowhere else
            seen |= keys
    teacher = cloud_split(data)
    assert not {row.tobytes() for row in teacher.train.x} & seen


def test_dirichlet_shards_are_skewed_and_cover_the_pool() -> None:
    data = load_dataset("digits")
    _, pool = presumed_split(len(data), 0.4)
    shards = [shard_indices(data.y, pool, Shard(i, 4), alpha=0.1) for i in range(4)]
    assert sorted(np.concatenate(shards).tolist()) == sorted(pool.tolist())
    iid = shard_indices(data.y, pool, Shard(0, 4), alpha=None)

    def top_class_share(index: np.ndarray) -> float:
        return float(np.bincount(data.y[index]).max() / len(index))

    assert max(top_class_share(s) for s in shards if len(s)) > 2 * top_class_share(iid)
