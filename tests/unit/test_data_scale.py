"""The synthetic generator at scale: chunked rendering is deterministic and leaves small splits unchanged."""

import numpy as np

from secure_fedvlp.data import synthetic
from secure_fedvlp.data.spec import SyntheticSpec


def _spec(n: int) -> SyntheticSpec:
    return SyntheticSpec(
        num_sites=1,
        heldout_site=False,
        train_per_site=n,
        val_per_site=1,
        test_per_site=1,
        public_size=0,
        image_size=16,
        seed=5,
    )


def test_a_split_within_one_chunk_renders_exactly_as_before(monkeypatch):
    spec = _spec(6)
    monkeypatch.setattr(synthetic, "RENDER_CHUNK", 6)
    chunked = synthetic._split(spec, "site1", 0, "train", "train", 6)
    monkeypatch.setattr(
        synthetic, "_render_chunked", lambda labels, style, size, rng, key: synthetic._render(labels, style, size, rng)
    )
    direct = synthetic._split(spec, "site1", 0, "train", "train", 6)
    np.testing.assert_array_equal(chunked.images, direct.images)
    assert list(chunked.reports) == list(direct.reports)


def test_a_large_split_renders_in_chunks_deterministically(monkeypatch):
    monkeypatch.setattr(synthetic, "RENDER_CHUNK", 4)
    calls = []
    render = synthetic._render

    def counting(labels, *a):
        calls.append(len(labels))
        return render(labels, *a)

    monkeypatch.setattr(synthetic, "_render", counting)
    a = synthetic._split(_spec(10), "site1", 0, "train", "train", 10)
    assert calls == [4, 4, 2]  # never more than one chunk of intermediates at a time
    b = synthetic._split(_spec(10), "site1", 0, "train", "train", 10)
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.masks, b.masks)
    assert list(a.reports) == list(b.reports)
    assert a.images.shape == (10, 16, 16) and a.images.dtype == np.float32
    assert len({a.images[i].tobytes() for i in range(10)}) == 10  # chunks do not repeat each other
