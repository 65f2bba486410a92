"""A synthetic physics world with exact captions: balls of several colours and sizes under
gravity, bouncing off the walls, the floor and each other, sometimes with a grey block on the
floor in front of them. Every clip has its own size, aspect ratio and duration, and a caption
that states what happens in it ("a small red ball falls and bounces twice on the right"),
including which balls the block covers in some frame (", partly behind a grey block"), or
that it covers none (", and a grey block").

    video, caption = render_clip(WorldConfig(), generator)      # [3, T, H, W] in [-1, 1], str

The simulation runs in pixel units with a few sub-steps per frame: gravity, wall and floor
bounces with restitution, and elastic collisions between balls (masses by area). A floor
bounce is counted when a ball hits the floor moving down faster than a threshold; the
caption counts them per ball and says on which half of the frame the last one was.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

COLOURS = {"red": (0.9, 0.15, 0.1), "green": (0.1, 0.8, 0.2), "blue": (0.15, 0.3, 0.95),
           "yellow": (0.95, 0.85, 0.1), "white": (0.95, 0.95, 0.95)}
# Ball radii as fractions of the frame's smaller side, and the frame rate, are set for the
# tiny end-to-end run: 32-pixel frames through a VAE that compresses 8x in space and 4x in time.
# With radii 0.06 / 0.12 (2 and 4 pixels) at 8 fps a ball moved up to 10 pixels within one
# latent frame, and 900 VAE steps gave blobs in the average ball colour; at 0.1 / 0.18 and 16
# fps the balls' own colours come back within 600 steps (docs/NOTES-vae.md).
RADII = {"small": 0.1, "large": 0.18}
COUNT_WORDS = {1: "once", 2: "twice", 3: "three times"}


@dataclass(frozen=True)
class WorldConfig:
    frames: tuple[int, ...] = (1, 5, 9, 13)                  # durations drawn from (1 + 4k: the VAE's)
    sizes: tuple[tuple[int, int], ...] = ((32, 32), (32, 48), (48, 32), (32, 64), (48, 48))   # (H, W)
    max_balls: int = 2
    occluder_prob: float = 0.3
    gravity: float = 2.5            # frame heights per second^2
    fps: float = 16.0
    restitution: float = 0.85
    substeps: int = 8

    def __post_init__(self):
        if not 1 <= self.max_balls <= len(COLOURS) * len(RADII):
            raise ValueError(f"max_balls: expected 1 to {len(COLOURS) * len(RADII)} (each ball a distinct colour and "
                             f"size, so that captions tell them apart), got {self.max_balls}")


@dataclass
class Ball:
    colour: str
    size: str
    radius: float                   # pixels
    x: float
    y: float
    vx: float
    vy: float
    bounces: int = 0
    last_bounce_x: float = 0.0
    fell: bool = False
    behind: bool = False            # partly behind the block in some rendered frame (_behind_block)


def _sample_balls(cfg: WorldConfig, H: int, W: int, rand) -> list[Ball]:
    n = 1 + int(rand() * cfg.max_balls)
    colours = list(COLOURS)
    balls = []
    for i in range(n):
        size = "small" if rand() < 0.5 else "large"
        taken = {b.colour for b in balls if b.size == size}
        if len(taken) == len(colours):          # every colour has a ball of this size: the other
            size = "large" if size == "small" else "small"
            taken = {b.colour for b in balls if b.size == size}
        r = RADII[size] * min(H, W)
        colour = colours[int(rand() * len(colours))]
        while colour in taken:                  # captions tell balls apart by colour and size
            colour = colours[(colours.index(colour) + 1) % len(colours)]
        x = r + rand() * (W - 2 * r)
        y = r + rand() * 0.5 * (H - 2 * r)                                   # upper half: room to fall
        balls.append(Ball(colour, size, r, x, y, (rand() * 2 - 1) * 0.4 * W, (rand() * 2 - 1) * 0.2 * H))
    return balls


def _step(balls: list[Ball], cfg: WorldConfig, H: int, W: int, dt: float) -> None:
    g = cfg.gravity * H
    for b in balls:
        b.vy += g * dt
        b.x += b.vx * dt
        b.y += b.vy * dt
        if b.vy > 0.05 * H:
            b.fell = True
        if b.x < b.radius:
            b.x, b.vx = b.radius, abs(b.vx) * cfg.restitution
        elif b.x > W - b.radius:
            b.x, b.vx = W - b.radius, -abs(b.vx) * cfg.restitution
        if b.y < b.radius:
            b.y, b.vy = b.radius, abs(b.vy) * cfg.restitution
        elif b.y > H - b.radius:
            if b.vy > 0.15 * H:      # a bounce, not a ball resting on the floor
                b.bounces += 1
                b.last_bounce_x = b.x
            b.y, b.vy = H - b.radius, -abs(b.vy) * cfg.restitution
    for i in range(len(balls)):      # elastic collisions, masses by area
        for j in range(i + 1, len(balls)):
            a, b = balls[i], balls[j]
            dx, dy = b.x - a.x, b.y - a.y
            dist = math.hypot(dx, dy)
            if 0 < dist < a.radius + b.radius:
                nx, ny = dx / dist, dy / dist
                rel = (a.vx - b.vx) * nx + (a.vy - b.vy) * ny
                if rel > 0:
                    ma, mb = a.radius ** 2, b.radius ** 2
                    k = 2 * rel / (ma + mb)
                    a.vx, a.vy = a.vx - k * mb * nx, a.vy - k * mb * ny
                    b.vx, b.vy = b.vx + k * ma * nx, b.vy + k * ma * ny
                overlap = a.radius + b.radius - dist
                a.x, a.y = a.x - nx * overlap / 2, a.y - ny * overlap / 2
                b.x, b.y = b.x + nx * overlap / 2, b.y + ny * overlap / 2


def _render(balls: list[Ball], occluder, H: int, W: int) -> torch.Tensor:
    """One frame [3, H, W] in [0, 1]: a dark gradient, the balls, then the occluder in front."""
    y = torch.arange(H, dtype=torch.float32).view(H, 1) + 0.5
    x = torch.arange(W, dtype=torch.float32).view(1, W) + 0.5
    frame = (0.1 + 0.15 * y / H).expand(H, W).unsqueeze(0).repeat(3, 1, 1)
    for b in balls:
        inside = (x - b.x) ** 2 + (y - b.y) ** 2 <= b.radius ** 2
        frame = torch.where(inside, torch.tensor(COLOURS[b.colour]).view(3, 1, 1), frame)
    if occluder is not None:
        x0, x1, y0, y1 = occluder
        frame[:, y0:y1, x0:x1] = 0.5
    return frame


def _behind_block(b: Ball, occluder, H: int, W: int) -> bool:
    """Whether the block covers some pixel of the ball's disc (a pixel whose centre is inside
    the disc, as _render draws it) in the current frame."""
    if occluder is None:
        return False
    x0, x1, y0, y1 = occluder
    y = torch.arange(y0, y1, dtype=torch.float32).view(-1, 1) + 0.5
    x = torch.arange(x0, x1, dtype=torch.float32).view(1, -1) + 0.5
    return bool(((x - b.x) ** 2 + (y - b.y) ** 2 <= b.radius ** 2).any())


def _names(balls: list[Ball]) -> str:
    """'the small red ball', 'the small red and large blue balls', 'the a, b and c balls'."""
    kinds = [f"{b.size} {b.colour}" for b in balls]
    if len(kinds) == 1:
        return f"the {kinds[0]} ball"
    return f"the {', '.join(kinds[:-1])} and {kinds[-1]} balls"


def _caption(balls: list[Ball], frames: int, W: int, occluder) -> str:
    """The clip's events, ball by ball. With a block: ", partly behind a grey block" when the
    only ball is behind it in some frame, ", the <size> <colour> ball(s) partly behind a grey
    block" naming those that are when there are several, ", and a grey block" when it hides
    no ball in any frame (Ball.behind, set while rendering)."""
    parts = []
    for b in balls:
        name = f"a {b.size} {b.colour} ball"
        if frames == 1:
            parts.append(f"{name} on the {'left' if b.x < W / 2 else 'right'}")
        elif b.bounces:
            side = "left" if b.last_bounce_x < W / 2 else "right"
            times = COUNT_WORDS.get(b.bounces, f"{b.bounces} times")
            parts.append(f"{name} {'falls and ' if b.fell else ''}bounces {times} on the {side}")
        else:
            parts.append(f"{name} {'falls' if b.fell else 'flies'}")
    text = ", ".join(parts)
    if occluder is None:
        return text
    behind = [b for b in balls if b.behind]
    if not behind:
        return text + ", and a grey block"
    if len(balls) == 1:
        return text + ", partly behind a grey block"
    return text + f", {_names(behind)} partly behind a grey block"


def render_clip(cfg: WorldConfig, generator: torch.Generator) -> tuple[torch.Tensor, str]:
    """(video [3, T, H, W] in [-1, 1], caption): one clip of a size and duration drawn from cfg."""
    def rand() -> float:
        return float(torch.rand((), generator=generator))
    T = cfg.frames[int(rand() * len(cfg.frames))]
    H, W = cfg.sizes[int(rand() * len(cfg.sizes))]
    balls = _sample_balls(cfg, H, W, rand)
    occluder = None
    if rand() < cfg.occluder_prob:
        ow, oh = max(2, int(W * 0.2)), max(2, int(H * 0.5))
        x0 = int(rand() * (W - ow))
        occluder = (x0, x0 + ow, H - oh, H)
    frames = []
    dt = 1.0 / (cfg.fps * cfg.substeps)
    for t in range(T):
        if t:
            for _ in range(cfg.substeps):
                _step(balls, cfg, H, W, dt)
        frames.append(_render(balls, occluder, H, W))
        for b in balls:
            b.behind = b.behind or _behind_block(b, occluder, H, W)
    video = torch.stack(frames, dim=1) * 2 - 1                               # [3, T, H, W]
    return video, _caption(balls, T, W, occluder)


def physics_clips(cfg: WorldConfig = WorldConfig(), seed: int = 0):
    """An endless stream of (video, caption) from the world."""
    g = torch.Generator().manual_seed(seed)
    while True:
        yield render_clip(cfg, g)


__all__ = ["WorldConfig", "render_clip", "physics_clips", "COLOURS", "RADII"]
