"""The keyboard state a keyboard-conditioned model reads: the vectorised count against a loop
over tokens, the training windows against the whole piece's state, and the sampler's
token-by-token state against the same count of what it sampled."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from perceiver_music.config import DataConfig, PrepareConfig, TokenizerConfig
from perceiver_music.data.prepare import prepare
from perceiver_music.data.windows import Conditions, TokenData, WindowDataset, transpose
from perceiver_music.model.conditioning import KEYBOARD_LOGIT_SCALE, Cond
from perceiver_music.sample import CachedStream, ReferenceStream
from perceiver_music.sample import Conditions as SampleConditions
from perceiver_music.tokens.performance import BOS, EOS, NUM_PITCHES, Vocab, held_at_end, keyboard_state
from test_conditioning import tiny

from conftest import random_pieces

TOKENIZER = TokenizerConfig()
VOCAB = Vocab(TOKENIZER)
V = 391


def loop_state(ids, held_before=None) -> np.ndarray:
    """keyboard_state as its definition reads, one token at a time."""
    sps = TOKENIZER.steps_per_second
    onset = {p: -h * sps for p, h in enumerate(held_before) if h >= 0} if held_before is not None else {}
    step, out = 0, []
    for token in ids:
        step += int(VOCAB.shift_steps(np.array([token]))[0])
        if VOCAB.note_on <= token < VOCAB.note_off:
            onset[token - VOCAB.note_on] = step
        elif VOCAB.note_off <= token < VOCAB.time_shift:
            onset.pop(token - VOCAB.note_off, None)
        row = np.full(NUM_PITCHES, -1.0)
        for p, t in onset.items():
            row[p] = (step - t) / sps
        out.append(row)
    return np.array(out, np.float32).reshape(len(ids), NUM_PITCHES)


def random_stream(rng, n, pitches=12) -> np.ndarray:
    """Notes on a few pitches with stray NOTE_OFFs and re-strikes among them, and time."""
    kind = rng.integers(0, 4, n)
    pitch = 60 + rng.integers(0, pitches, n)
    return np.select(
        [kind == 0, kind == 1, kind == 2],
        [VOCAB.note_on + pitch, VOCAB.note_off + pitch, VOCAB.time_shift + rng.integers(0, 50, n)],
        VOCAB.velocity + rng.integers(0, 32, n),
    )


@pytest.mark.parametrize("seed", range(4))
def test_the_vectorised_state_is_the_loops(seed):
    rng = np.random.default_rng(seed)
    ids = random_stream(rng, 300)
    assert np.allclose(keyboard_state(ids, VOCAB), loop_state(ids), atol=1e-6)
    assert np.allclose(held_at_end(ids, VOCAB), loop_state(ids)[-1], atol=1e-6)
    # Split anywhere, the second part carried on from the first's end is the whole.
    cut = int(rng.integers(1, 299))
    carried = keyboard_state(ids[cut:], VOCAB, held_at_end(ids[:cut], VOCAB))
    assert np.allclose(carried, keyboard_state(ids, VOCAB)[cut:], atol=1e-5)
    assert (keyboard_state(ids, VOCAB) >= 0).any() and (keyboard_state(ids, VOCAB) < 0).any()
    assert len(keyboard_state(ids[:0], VOCAB)) == 0 and (held_at_end(ids[:0], VOCAB) == -1).all()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("keys")
    # Long notes (2 s) that overlap: many are held into a window from before it.
    midi = random_pieces(root / "midi", 4, seed=5, notes=200, span_ms=40_000, length_ms=2000)
    prepare(midi, root / "data", PrepareConfig(workers=1, split="hash", valid_fraction=0.25), progress=False)
    return root / "data"


def test_validation_windows_carry_the_whole_pieces_state(data_dir):
    data = TokenData(data_dir, "train")
    ds = WindowDataset(data, DataConfig(), 64, 16, train=False, conditions=Conditions(keyboard=True))
    carried_in = 0
    for i in range(0, len(ds), 7):
        w = ds[i]
        piece = np.asarray(data.piece(w.piece))
        whole = keyboard_state(piece, VOCAB)
        real = w.inputs != 0  # PAD inputs are silent
        assert np.allclose(w.keyboard[real], whole[w.positions[real]], atol=1e-5)
        assert (w.keyboard[~real] == -1).all()
        first = w.positions[real][0]
        carried_in += int(first > 0 and (whole[first - 1] >= 0).any())
    assert carried_in > 0  # notes held from before a window were counted


def test_a_transposed_windows_state_is_the_transposed_pieces(data_dir):
    data = TokenData(data_dir, "train")
    cfg = DataConfig(transpose=3, stretch=0.0)
    ds = WindowDataset(data, cfg, 64, 16, train=True, seed=2, conditions=Conditions(keyboard=True))
    checked = 0
    for i in range(40):
        w = ds[i]
        piece = np.asarray(data.piece(w.piece))
        for shift in range(-3, 4):  # the window's shift: the one whose tokens match
            moved = transpose(piece, shift, VOCAB)
            if len(moved) != len(piece):
                continue  # a note left the keyboard: positions no longer line up
            real = w.inputs != 0
            if np.array_equal(moved[w.positions[real]], w.inputs[real]):
                whole = keyboard_state(moved, VOCAB)
                assert np.allclose(w.keyboard[real], whole[w.positions[real]], atol=1e-5)
                checked += 1
                break
    assert checked > 10


@pytest.mark.parametrize("stream", [CachedStream, ReferenceStream])
def test_the_sampler_follows_the_state_of_what_it_samples(stream):
    model = tiny(["keyboard"], arch="perceiver_ar", scales=["full"])
    rng = np.random.default_rng(1)
    prompt = torch.as_tensor(random_stream(rng, 2 * 9).reshape(2, 9))
    prompt[:, 0] = BOS
    forced = torch.as_tensor(random_stream(rng, 2 * 50).reshape(2, 50))
    s = stream(model, prompt, 60, cond=SampleConditions().cond(2, "cpu"), tokenizer=TOKENIZER)
    with torch.no_grad():
        for i in range(50):
            s.append(forced[:, i])
    for row in range(2):
        tokens = s.tokens[row, : s.length].numpy()
        assert np.allclose(s.keyboard[row, : s.length].numpy(), keyboard_state(tokens, VOCAB), atol=1e-4)


def test_keyboard_logits_fall_on_the_events_the_keyboard_rules_out():
    """After BOS, NOTE_ON 60, a TIME_SHIFT and NOTE_ON 64: 60 is down, 64 was struck at this
    instant, 61 is up. Each learnt logit lands on its event, and the gradient of the likelihood of
    what a performance plays pushes the held key's re-strike down."""
    model = tiny(["keyboard"], arch="perceiver_ar", scales=["full"], keyboard_logits=True)
    c = model.conditioner
    with torch.no_grad():
        for p, base in ((c.on_held, 1.0), (c.off_silent, 2.0), (c.off_struck, 3.0), (c.eos_held, 4.0)):
            p.copy_(base + torch.arange(len(p)) / 1000)
    on, off = VOCAB.note_on, VOCAB.note_off
    ids = np.array([BOS, on + 60, VOCAB.time_shift + 9, on + 64])
    state = torch.as_tensor(keyboard_state(ids, VOCAB))[None]  # [1, 4, 128]
    bias = c.logit_bias(Cond(keyboard=state), 1, 4, V)[0].detach()  # [4, V]
    s = KEYBOARD_LOGIT_SCALE
    last = bias[-1]
    assert last[on + 60] == pytest.approx(s * (1 + 0.060)) and last[on + 61] == 0
    assert last[off + 61] == pytest.approx(s * (2 + 0.061)) and last[off + 60] == 0
    assert last[off + 64] == pytest.approx(s * (3 + 0.064))
    assert last[EOS] == pytest.approx(s * 4) and bias[0, EOS] == 0  # nothing down after BOS
    assert bias[0, on + 60] == 0 and bias[0, off + 60] == pytest.approx(s * (2 + 0.060))
    others = torch.ones(V, dtype=torch.bool)
    others[[EOS, *range(on, on + NUM_PITCHES), *range(off, off + NUM_PITCHES)]] = False
    assert (bias[:, others] == 0).all()  # time and velocity are never touched

    model.train()
    tokens = torch.as_tensor(np.append(ids, on + 67))[None]  # the performance goes on: 67 is struck
    logits = model(tokens[:, :-1], torch.arange(4)[None], num_latents=4, cond=Cond(keyboard=state))
    model.loss(logits, tokens[:, 1:]).backward()
    assert c.on_held.grad[60] > 0  # descent lowers the logit of striking 60 again while it is down
