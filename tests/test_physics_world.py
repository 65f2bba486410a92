"""The synthetic physics world (sora_model/physics_world.py): clip sizes and durations from the
config, the mechanics (free fall, floor bounces, momentum in collisions), captions that
match the simulated events and the rendered colours."""
import itertools
import math

import torch

from sora_model.physics_world import (COLOURS, RADII, Ball, WorldConfig, _caption, _sample_balls, _step, physics_clips,
                                      render_clip)


def test_clip_sizes_durations_and_determinism():
    cfg = WorldConfig()
    clips = list(itertools.islice(physics_clips(cfg, seed=0), 40))
    shapes = {tuple(v.shape) for v, _ in clips}
    assert len({s[1] for s in shapes}) >= 3 and len({s[2:] for s in shapes}) >= 3   # durations, aspect ratios
    for v, caption in clips:
        assert v.shape[0] == 3 and v.shape[1] in cfg.frames and tuple(v.shape[2:]) in cfg.sizes
        assert -1 <= v.min() and v.max() <= 1 and caption.startswith("a ")
    again = list(itertools.islice(physics_clips(cfg, seed=0), 40))
    assert all(torch.equal(a[0], b[0]) and a[1] == b[1] for a, b in zip(clips, again))


def test_config_errors():
    import pytest
    with pytest.raises(ValueError, match=r"max_balls: expected 1 to 10 \(each ball a distinct colour and size"):
        WorldConfig(max_balls=11)


def test_every_ball_count_the_config_allows():
    """Up to all 10 (colour, size) pairs in one clip: a size whose colours are all taken gives
    way to the other size (it used to loop forever looking for a free colour)."""
    cfg = WorldConfig(max_balls=len(COLOURS) * len(RADII))
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        balls = _sample_balls(cfg, 32, 48, lambda: torch.rand((), generator=g).item())
        assert len({(b.colour, b.size) for b in balls}) == len(balls)
    always_small = iter([0.999] + [0.0] * 6 * 10)    # 10 balls, each drawn small and red (6 draws a ball)
    balls = _sample_balls(cfg, 32, 48, lambda: next(always_small))
    assert len(balls) == 10 and {(b.colour, b.size) for b in balls} == {(c, s) for c in COLOURS for s in RADII}
    video, caption = render_clip(cfg, torch.Generator().manual_seed(0))
    assert caption.startswith("a ")


def test_free_fall_and_floor_bounce():
    cfg = WorldConfig(gravity=2.0, restitution=0.5)
    H = W = 100
    ball = Ball("red", "small", 5.0, 50.0, 10.0, 0.0, 0.0)
    dt, steps = 0.01, 20
    for _ in range(steps):
        _step([ball], cfg, H, W, dt)
    g = cfg.gravity * H
    t = dt * steps
    assert abs(ball.vy - g * t) < 1e-6
    assert abs(ball.y - (10.0 + 0.5 * g * t * t)) < 0.5 * g * dt * t + 1e-6   # semi-implicit Euler's error
    assert ball.bounces == 0 and ball.fell
    for _ in range(200):
        _step([ball], cfg, H, W, dt)
        if ball.bounces:
            break
    assert ball.bounces == 1 and ball.vy < 0 and ball.last_bounce_x == 50.0


def test_collisions_conserve_momentum():
    cfg = WorldConfig(gravity=0.0)
    a = Ball("red", "small", 4.0, 40.0, 50.0, 30.0, 0.0)
    b = Ball("blue", "large", 8.0, 50.0, 52.0, -10.0, 0.0)            # overlapping, approaching
    ma, mb = a.radius ** 2, b.radius ** 2
    before = (ma * a.vx + mb * b.vx, ma * a.vy + mb * b.vy)
    energy = 0.5 * (ma * (a.vx ** 2 + a.vy ** 2) + mb * (b.vx ** 2 + b.vy ** 2))
    _step([a, b], cfg, 100, 100, 0.001)
    after = (ma * a.vx + mb * b.vx, ma * a.vy + mb * b.vy)
    assert math.isclose(before[0], after[0], rel_tol=1e-9) and abs(before[1] - after[1]) < 1e-9
    assert math.isclose(energy, 0.5 * (ma * (a.vx ** 2 + a.vy ** 2) + mb * (b.vx ** 2 + b.vy ** 2)), rel_tol=1e-9)
    assert a.vx < 30.0                                                     # they did collide


def test_captions_state_the_events():
    def ball(**kw):
        return Ball(**{"colour": "red", "size": "small", "radius": 3.0, "x": 10.0, "y": 10.0, "vx": 0.0, "vy": 0.0,
                       **kw})
    assert _caption([ball(bounces=2, last_bounce_x=80.0, fell=True)], 9, 100, None) == \
        "a small red ball falls and bounces twice on the right"
    assert _caption([ball(fell=True), ball(colour="blue", size="large", bounces=1, last_bounce_x=5.0, fell=True,
                                           behind=True)], 9, 100, (0, 1, 0, 1)) == \
        "a small red ball falls, a large blue ball falls and bounces once on the left, the large blue ball partly " \
        "behind a grey block"
    assert _caption([ball(x=70.0)], 1, 100, None) == "a small red ball on the right"


def test_caption_colours_are_in_the_first_frame():
    g = torch.Generator().manual_seed(3)
    cfg = WorldConfig(occluder_prob=0.0)
    for _ in range(15):
        video, caption = render_clip(cfg, g)
        frame = (video[:, 0] + 1) / 2                                       # [3, H, W] in [0, 1]
        for name, rgb in COLOURS.items():
            present = ((frame - torch.tensor(rgb).view(3, 1, 1)).abs().amax(0) < 1e-4).any()
            assert bool(present) == (f" {name} ball" in caption), (name, caption)


def test_captions_name_the_balls_behind_the_block():
    def ball(**kw):
        return Ball(**{"colour": "red", "size": "small", "radius": 3.0, "x": 10.0, "y": 10.0, "vx": 0.0, "vy": 0.0,
                       "fell": True, **kw})
    block = (0, 1, 0, 1)
    assert _caption([ball()], 9, 100, block) == "a small red ball falls, and a grey block"
    assert _caption([ball(behind=True)], 9, 100, block) == "a small red ball falls, partly behind a grey block"
    two = [ball(), ball(colour="blue", size="large", behind=True)]
    assert _caption(two, 9, 100, block) == \
        "a small red ball falls, a large blue ball falls, the large blue ball partly behind a grey block"
    two[0].behind = True
    assert _caption(two, 9, 100, block) == \
        "a small red ball falls, a large blue ball falls, the small red and large blue balls partly behind a grey block"
    assert _caption(two, 9, 100, None) == "a small red ball falls, a large blue ball falls"


def test_block_phrase_matches_the_rendered_frames():
    """With a block in every clip, the caption names exactly the balls whose discs reach into
    the block's rectangle in some frame. The same seed without a block draws the same balls and
    motion (the block is drawn last and moves nothing), so those frames show what it covers."""
    import re
    hidden_counts = []
    for seed in range(40):
        with_block, caption = render_clip(WorldConfig(occluder_prob=1.0), torch.Generator().manual_seed(seed))
        free, free_caption = render_clip(WorldConfig(occluder_prob=0.0), torch.Generator().manual_seed(seed))
        block = (with_block == 0).all(0).all(0)                           # the grey block: 0.5 -> 0 in [-1, 1]
        assert block.any() and caption.startswith(free_caption + ", ")
        seen = set()                                                      # colours of ball pixels in the block
        for name, rgb in COLOURS.items():
            colour = torch.tensor(rgb).view(3, 1, 1, 1) * 2 - 1
            if ((free - colour).abs().amax(0) < 1e-4)[:, block].any():
                seen.add(name)
        tail = caption[len(free_caption) + 2:]
        if tail == "and a grey block":
            named = set()
        elif tail == "partly behind a grey block":
            named = set(re.findall(r"a (?:small|large) (\w+) ball", free_caption))
            assert len(named) == 1, caption
        else:
            m = re.fullmatch(r"the (.+) balls? partly behind a grey block", tail)
            assert m, caption
            named = set(re.findall(r"(?:small|large) (\w+)", m.group(1)))
        assert named == seen, (seed, caption, seen)
        hidden_counts.append(len(seen))
    assert 0 in hidden_counts and any(hidden_counts), hidden_counts      # both cases were checked
