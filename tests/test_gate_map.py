"""The gate map in the engine (engine/gate_map.py): keys and queries pass through one map, the
gate stays exact and bit-identical where closed, a saved database keeps its own copy of the map,
and a map for another space, a damaged copy or a config that disagrees with the files is
refused with one line naming what is wrong. On tiny random models."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from neuraldb import EditConfig, NeuralDB
from neuraldb.engine.config import ConfigError
from neuraldb.engine.gate_map import GateMap, load_map, maps, space_meta
from neuraldb.engine.persistence import MAP_FILE, DatabaseError
from neuraldb.engine.space import Capture, key_space
from neuraldb.engine.tokens import encode_with_subject
from neuraldb.kernels import l2_normalize

from conftest import make_model
from test_engine import CFG, FACTS, UNRELATED, ffn_outputs, logits

CTX = CFG.replace(gate_context=2, gamma=0.6, n_prefixes=0, residual_prefixes=0, steps=2)


def mapped(tokenizer, tmp_path: Path, cfg: EditConfig = CTX) -> tuple[torch.nn.Module, EditConfig]:
    """A tiny Llama and `cfg` naming a random map that carries the metadata of its space."""
    model = make_model("llama", tokenizer)
    db = NeuralDB(model, tokenizer, cfg, attach=False)
    g = torch.Generator().manual_seed(0)
    U, V = (torch.randn(db.d_key, 4, generator=g) * 0.3 for _ in range(2))
    GateMap(U, V, db.map_meta()).save(tmp_path / "map.safetensors")
    return model, cfg.replace(gate_map=str(tmp_path / "map.safetensors"))


def saved(model: torch.nn.Module, tokenizer, cfg: EditConfig, where: Path) -> tuple[NeuralDB, torch.Tensor]:
    """A database of FACTS saved to `where` and detached, and the logits it gave TEXTS."""
    db = NeuralDB(model, tokenizer, cfg)
    db.add(FACTS)
    want = logits(model, tokenizer, TEXTS)
    db.save(where)
    db.detach()
    return db, want


TEXTS = [f.text for f in FACTS] + UNRELATED


@pytest.mark.parametrize("context", [0, 2])
def test_keys_and_queries_share_the_map(tokenizer, tmp_path: Path, context: int) -> None:
    """A key is T(plain key); the gate's query at a token is T(plain query) there; at the fact's
    own bare prompt they coincide (cosine 1) and the gate opens on its own fact; closed tokens
    keep the unedited bits."""
    model, cfg = mapped(tokenizer, tmp_path, CTX.replace(gate_context=context))
    db = NeuralDB(model, tokenizer, cfg)
    assert db.gate_map is not None and db.space.gate_map is db.gate_map
    plain = NeuralDB(model, tokenizer, cfg.replace(gate_map=""), attach=False)
    keys, pk = db.encode_keys(FACTS), plain.encode_keys(FACTS)
    assert torch.allclose(keys, db.gate_map(pk), atol=1e-6)
    assert torch.allclose(keys.norm(dim=-1), torch.ones(len(FACTS)), atol=1e-5)
    ids = db.add(FACTS)
    enc = tokenizer([FACTS[0].text, UNRELATED[0]], return_tensors="pt", padding=True)
    with Capture(model, key_space(model, db.layer, cfg.replace(gate_map="")), stop=False) as cap, torch.no_grad():
        with db.disabled():
            model(**enc)
    out = ffn_outputs(model, db.add_path, enc)
    sims, hit, open_ = db.gate.last
    last = encode_with_subject(tokenizer, "", FACTS[0].prompt, FACTS[0].subject).subject_last
    assert float(sims[0, last]) == pytest.approx(1.0, abs=1e-5) and int(hit[0, last]) == ids[0]
    q = db.gate_map(plain.space.plain(cap.raw.reshape(-1, cap.raw.shape[-1])))  # (B*T, dim)
    k = l2_normalize(db.index.export()[1])  # (F, dim)
    best = (l2_normalize(q) @ k.T).max(1).values.view(sims.shape)  # (B, T)
    gated = db.gate.last_mask
    assert torch.allclose(sims[gated], best[gated], atol=1e-5)
    with db.disabled():
        base = ffn_outputs(model, db.add_path, enc)
    assert torch.equal(out[~open_], base[~open_]) and not torch.equal(out[open_], base[open_])


def test_zero_map_is_the_plain_gate(tokenizer, tmp_path: Path) -> None:
    model = make_model("llama", tokenizer)
    plain = NeuralDB(model, tokenizer, CTX)
    plain.add(FACTS)
    want, want_open = logits(model, tokenizer, TEXTS), plain.gate.last[2].clone()
    plain.detach()
    d = plain.d_key
    GateMap(torch.zeros(d, 3), torch.randn(d, 3), plain.map_meta()).save(tmp_path / "zero.safetensors")
    db = NeuralDB(model, tokenizer, CTX.replace(gate_map=str(tmp_path / "zero.safetensors")))
    db.add(FACTS)
    got = logits(model, tokenizer, TEXTS)
    assert torch.equal(db.gate.last[2], want_open)
    assert torch.allclose(got, want, atol=1e-4)


def test_saved_database_keeps_its_map(tokenizer, tmp_path: Path) -> None:
    """The database directory holds a copy of the map (listed with its sha256): it loads, gates
    and generates as before after the original file is deleted; a damaged or missing copy is
    refused naming the file."""
    model, cfg = mapped(tokenizer, tmp_path)
    db, want = saved(model, tokenizer, cfg, tmp_path / "db")
    assert (tmp_path / "db" / MAP_FILE).is_file()
    (tmp_path / "map.safetensors").unlink()
    back = NeuralDB.load(tmp_path / "db", model, tokenizer)
    assert back.config.gate_map == cfg.gate_map and torch.equal(back.gate_map.U, db.gate_map.U)
    assert torch.equal(logits(model, tokenizer, TEXTS), want)
    back.remove([0])
    back.save(tmp_path / "db")  # a re-save keeps the copy
    back.detach()
    NeuralDB.load(tmp_path / "db", model, tokenizer).detach()

    raw = bytearray((tmp_path / "db" / MAP_FILE).read_bytes())
    raw[-8:] = b"\x00" * 8
    (tmp_path / "db" / MAP_FILE).write_bytes(bytes(raw))
    with pytest.raises(DatabaseError, match="gate_map.safetensors: checksum mismatch"):
        NeuralDB.load(tmp_path / "db", model, tokenizer)
    (tmp_path / "db" / MAP_FILE).unlink()
    with pytest.raises(DatabaseError, match="gate_map.safetensors: missing database file"):
        NeuralDB.load(tmp_path / "db", model, tokenizer)


def test_a_map_for_another_space_is_refused(tokenizer, tmp_path: Path) -> None:
    model, cfg = mapped(tokenizer, tmp_path)
    with pytest.raises(ConfigError, match="gate_context=2; this database has gate_context=1"):
        NeuralDB(model, tokenizer, cfg.replace(gate_context=1), attach=False)
    with pytest.raises(ConfigError, match="the map is .*-dimensional"):
        NeuralDB(model, tokenizer, cfg.replace(gate_context=0), attach=False)
    other = make_model("llama", tokenizer, seed=1)
    with pytest.raises(ConfigError, match="layer_sha256"):
        NeuralDB(other, tokenizer, cfg, attach=False)
    with pytest.raises(ConfigError, match="EditConfig.gate_map 'no-such-map': neither a shipped map"):
        NeuralDB(model, tokenizer, cfg.replace(gate_map="no-such-map"), attach=False)
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(ConfigError, match="junk.safetensors: not a gate map"):
        NeuralDB(model, tokenizer, cfg.replace(gate_map=str(tmp_path / "junk.safetensors")), attach=False)


def test_space_meta_names_the_space() -> None:
    m = space_meta(6, 5, 0.5, 2112, "ab")
    assert m == {"layer": "6", "gate_context": "5", "gate_context_weight": "0.5", "dim": "2112", "layer_sha256": "ab"}
    assert all(isinstance(n, str) for n in maps())


def test_a_database_saved_before_gate_maps_loads_as_it_was(tokenizer, tmp_path: Path) -> None:
    """A config.yaml without the gate_map key (every database saved before it existed) opens
    with no map, whatever the model's defaults now say, and gates as before."""
    import yaml

    from neuraldb.engine.persistence import CHECKSUM_PREFIX, _sealed_yaml

    model = make_model("llama", tokenizer)
    _, want = saved(model, tokenizer, CTX, tmp_path / "db")
    cfg = tmp_path / "db" / "config.yaml"
    meta = yaml.safe_load(cfg.read_text().rpartition(CHECKSUM_PREFIX)[0])
    del meta["config"]["gate_map"]
    cfg.write_text(_sealed_yaml(meta))
    back = NeuralDB.load(tmp_path / "db", model, tokenizer)
    assert back.gate_map is None and back.config.gate_map == ""
    assert torch.equal(logits(model, tokenizer, TEXTS), want)


def test_bench_gate_applies_a_saved_map_as_the_engine_does(tokenizer, tmp_path: Path) -> None:
    """bench/gate.py's `,map=NAME` design: the map over the one-pass derivation gives the
    engine's own mapped keys."""
    from neuraldb.bench.gate import Design, derive, wide_space
    from neuraldb.engine.gate_map import load_map
    from neuraldb.engine.keys import compute_keys

    model, cfg = mapped(tokenizer, tmp_path)
    db = NeuralDB(model, tokenizer, cfg, attach=False)
    wide = wide_space(model, db.layer)
    raw = compute_keys(model, tokenizer, FACTS, db.layer, db.ensure_prefixes(), cfg, space=wide)
    d = Design.parse(f"ffn+ctx2,map={cfg.gate_map}")
    assert d.gate_map == cfg.gate_map and d.context == 2
    assert torch.allclose(load_map(d.gate_map)(derive(wide, d, raw, None)), db.encode_keys(FACTS), atol=1e-5)


def test_every_shipped_profile_names_a_shipped_map_fitted_for_its_space() -> None:
    """A shipped profile's gate_map resolves to a shipped file whose recorded space (layer,
    gate_context, weight) is the profile's own, by the engine's own check (`GateMap.check`); the
    engine would refuse it otherwise, but only once the real model is loaded, which CI does not do
    for every model. The dim and layer hash need the model, so they are taken from the file."""
    from importlib import resources

    from neuraldb.engine.profile import find_profile

    shipped = resources.files("neuraldb.engine").joinpath("defaults")
    named = 0
    for f in shipped.iterdir():
        if not f.name.endswith(".yaml"):
            continue
        prof, _ = find_profile(f.name[: -len(".yaml")], "")
        if not prof.gate_map:
            continue
        assert prof.gate_map in maps(), f"{f.name}: gate_map {prof.gate_map!r} is not shipped"
        gm = load_map(prof.gate_map)
        gm.check(space_meta(prof.layer, prof.gate_context, prof.gate_context_weight, gm.dim,
                            gm.meta["layer_sha256"]), f.name)
        named += 1
    assert named >= 1  # Gemma-3-270M's carries one (SmolLM2's calibrated profile chose none)
