"""Locked-tower features on disk: the same towers read them back exactly; other towers or a bad file never use them."""

import os
import stat

import numpy as np
import pytest
import torch

from secure_fedvlp.models import create_model
from secure_fedvlp.models.feature_cache import (
    PersistentFeatures,
    load_features,
    locked_towers_digest,
    save_features,
)


def _heads_only(seed: int = 0):
    torch.manual_seed(seed)
    m = create_model("tiny")
    m.restrict_trainable("heads")
    return m.eval()


def _inputs(m):
    x = torch.rand(4, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    tok = m.tokenize(["no acute findings", "small right pleural effusion", "cardiomegaly", "a longer report " * 3])
    return x, tok


def test_a_second_model_with_the_same_towers_reads_the_features_back_exactly(tmp_path):
    a = _heads_only()
    x, tok = _inputs(a)
    img, txt = a.image_features(x), a.text_features(tok["input_ids"], tok["attention_mask"])
    path = tmp_path / "f.npz"
    assert save_features(a, path) == 8
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600  # functions of a site's records: owner only
    b = _heads_only()
    with torch.no_grad():  # b's heads move; its towers do not: the file is still b's
        b.image_head.weight.mul_(-1.0)
    assert locked_towers_digest(b) == locked_towers_digest(a)
    assert load_features(b, path) == 8
    # served from the file: the tower is not run (a tower that fails if called proves it)
    b.image_encoder.forward = lambda *_: (_ for _ in ()).throw(AssertionError("the tower ran"))
    torch.testing.assert_close(b.image_features(x), img)
    torch.testing.assert_close(b.text_features(tok["input_ids"], tok["attention_mask"]), txt)


def test_features_of_other_towers_are_ignored(tmp_path):
    a = _heads_only(seed=0)
    x, tok = _inputs(a)
    a.image_features(x)
    a.text_features(tok["input_ids"], tok["attention_mask"])
    path = tmp_path / "f.npz"
    save_features(a, path)
    other = _heads_only(seed=0)
    with torch.no_grad():
        next(other.image_encoder.parameters()).add_(1e-3)  # one changed tower weight
    assert locked_towers_digest(other) != locked_towers_digest(a)
    assert load_features(other, path) == 0
    assert not other._image_cache and not other.text_encoder._pooled
    # a tower that trains keeps no cache and has nothing to share
    full = create_model("tiny")
    assert locked_towers_digest(full) is None and save_features(full, tmp_path / "g.npz") == 0
    assert not (tmp_path / "g.npz").exists()


@pytest.mark.parametrize("damage", ["truncated", "not-npz", "pickle"])
def test_an_unreadable_or_hostile_file_is_ignored_and_the_features_recomputed(tmp_path, damage):
    a = _heads_only()
    x, _ = _inputs(a)
    direct = a.image_features(x).clone()
    path = tmp_path / "f.npz"
    save_features(a, path)
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:100])
    elif damage == "not-npz":
        path.write_text("hello")
    else:  # an object array needs pickle to load: refused, never executed
        np.savez(
            path, digest=np.frombuffer(locked_towers_digest(a).encode(), np.uint8), image_keys=np.array([object()])
        )
    b = _heads_only()
    assert load_features(b, path) == 0
    torch.testing.assert_close(b.image_features(x), direct)


def test_persistent_features_write_only_when_the_caches_grew(tmp_path):
    a = _heads_only()
    x, tok = _inputs(a)
    keep = PersistentFeatures(a, tmp_path / "features", "site1")
    assert keep.load() == 0
    keep.sync()
    assert not keep.path.exists()  # nothing computed yet: nothing written
    a.image_features(x)
    keep.sync()
    first = keep.path.stat().st_mtime_ns
    a.image_features(x)  # nothing new
    keep.sync()
    assert keep.path.stat().st_mtime_ns == first
    a.text_features(tok["input_ids"], tok["attention_mask"])
    keep.sync()
    b = _heads_only()
    again = PersistentFeatures(b, tmp_path / "features", "site1")
    assert again.path == keep.path and again.load() == 8


def test_two_processes_of_one_site_merge_their_features_and_read_each_others(tmp_path):
    """Two holders of one site's features (two simulation actors, or two deployment processes): the one that
    built its caches first (for an evaluation) reads what the other computed later (for training) before it
    works, and neither one's write drops the other's entries."""
    a, b = _heads_only(), _heads_only()
    x, tok = _inputs(a)
    keep_a = PersistentFeatures(a, tmp_path / "features", "site1")
    keep_b = PersistentFeatures(b, tmp_path / "features", "site1")
    assert keep_a.load() == 0 and keep_b.load() == 0  # both start before anything is on disk
    b.image_features(x)  # b evaluates: the images
    keep_b.sync()
    a.text_features(tok["input_ids"], tok["attention_mask"])  # a trains: the reports
    keep_a.sync()  # a merges b's images before writing: the file holds both
    assert load_features(_heads_only(), keep_a.path) == 8
    assert keep_b.refresh() == 8  # b reads a's reports before its next job, without a tower run
    b.text_encoder._locked_states = lambda *_: (_ for _ in ()).throw(AssertionError("the tower ran"))
    b.text_features(tok["input_ids"], tok["attention_mask"])
    assert keep_b.refresh() == 0  # the file has not changed since: nothing is read again
    keep_b.sync()
    assert load_features(_heads_only(), keep_b.path) == 8


def test_a_second_run_reads_the_sites_features_and_trains_the_same_model(tmp_path):
    """Two runs of one config through the real ClientApp: the first writes each site's locked-tower features,
    the second reads them (its towers run on nothing it already had) and ends at the same model."""
    from secure_fedvlp.flower import client_app
    from secure_fedvlp.wire import arrays_to_numpy
    from tests.unit.test_methods_contract import run_method, tiny_cfg

    cfg = tiny_cfg(tmp_path, "fedavg", model={"name": "tiny", "trainable": "heads"})
    finals, loaded = [], []
    for run in ("a", "b"):
        (tmp_path / run).mkdir()
        _, result, _, _, _ = run_method(cfg, tmp_path / run)
        finals.append(arrays_to_numpy(result.arrays))
        runtimes = [r for k, r in client_app._RUNTIMES.items() if k[1] == str(tmp_path / run / "run")]
        assert runtimes and all(r.features is not None for r in runtimes)
        loaded.append({r.site.name: r.features.loaded for r in runtimes})
    files = sorted(p.name for p in (tmp_path / "cache" / "features").iterdir())
    assert {f.split("-")[0] for f in files} == {"site1", "site2", "heldout"}
    assert all(n == 0 for n in loaded[0].values())  # the first run computed everything
    assert all(n > 0 for n in loaded[1].values())  # the second read it
    assert all(np.array_equal(finals[0][k], finals[1][k]) for k in finals[0])
    off = tiny_cfg(
        tmp_path / "off", "fedavg", model={"name": "tiny", "trainable": "heads"}, data={"cache_features": False}
    )
    (tmp_path / "off").mkdir(exist_ok=True)
    run_method(off, tmp_path / "off")
    assert not (tmp_path / "off" / "cache" / "features").exists()


def test_the_operator_computes_the_public_sets_features_once_and_every_site_reads_them(tmp_path):
    """The public bank's locked-tower features, computed once before any site trains: a site's model with the same
    towers builds its bank from the file without running a tower, the file is never rewritten by a site, and a
    run that finds it ends at the same model as one that computed everything itself."""
    from secure_fedvlp.build import build_federation
    from secure_fedvlp.flower import client_app
    from secure_fedvlp.methods.trainer import CurrentBank
    from secure_fedvlp.wire import arrays_to_numpy
    from secure_fedvlp.wrappers.compose import method_model
    from tests.unit.test_methods_contract import run_method, tiny_cfg

    def cfg_at(root, **train):
        train = {"objective": "decomposable", "bank": "current", **train}
        return tiny_cfg(root, "fedavg", model={"name": "tiny", "trainable": "heads"}, train=train)

    cfg = cfg_at(tmp_path / "a")
    public = build_federation(cfg).public
    n = client_app.prepare_public_features(cfg, public)
    directory, stem = client_app.public_features_file(cfg)
    [path] = list(directory.iterdir())
    assert path.name.startswith(stem + "-") and directory.name != "features"  # never one of the sites' files
    assert 0 < n <= 2 * len(public)
    written = path.read_bytes()
    assert client_app.prepare_public_features(cfg, public) == n and path.read_bytes() == written  # read, not redone

    site_model = method_model(cfg)
    assert PersistentFeatures(site_model, directory, stem).load() == n
    boom = AssertionError("a tower ran on the public set")
    site_model.image_encoder.forward = lambda *_, **__: (_ for _ in ()).throw(boom)
    site_model.text_encoder.encoder.forward = lambda *_, **__: (_ for _ in ()).throw(boom)
    served = CurrentBank(site_model, public, 4, torch.device("cpu")).embed(site_model)
    computed = CurrentBank(method_model(cfg), public, 4, torch.device("cpu")).embed(method_model(cfg))
    for a, b in zip(served, computed, strict=True):
        torch.testing.assert_close(a, b)

    finals = []
    for root, prepared in ((tmp_path / "a", True), (tmp_path / "b", False)):
        run_cfg = cfg_at(root)
        (root / "out").mkdir(parents=True)
        _, result, _, _, _ = run_method(run_cfg, root / "out")
        finals.append(arrays_to_numpy(result.arrays))
        assert (client_app.public_features_file(run_cfg)[0].exists()) is prepared
        runtimes = [r for k, r in client_app._RUNTIMES.items() if k[1] == str(root / "out" / "run")]
        assert runtimes and all(r.public_loaded == (n if prepared else 0) for r in runtimes)
    assert path.read_bytes() == written  # sites read the file; none writes to it
    assert all(np.array_equal(finals[0][k], finals[1][k]) for k in finals[0])

    # a cache that cannot be written fails nothing: the sites compute the features themselves
    ro = cfg_at(tmp_path / "e")
    blocked = client_app.public_features_file(ro)[0]
    blocked.parent.mkdir(parents=True)
    blocked.write_text("a file where the directory should be")
    assert client_app.prepare_public_features(ro, public) == 0

    # nothing to do where the public set is not embedded by locked towers at every job
    for other in (cfg_at(tmp_path / "c", objective="decomposable", bank="global"), tiny_cfg(tmp_path / "d", "fedavg")):
        assert client_app.prepare_public_features(other, public) == 0
        assert not client_app.public_features_file(other)[0].exists()
