"""Per-user relationship stats (the seed's keys plus tier and trend) and a small PNG chart."""

from __future__ import annotations

import io
from datetime import timedelta

from bot.reports import ReplyTrace, ViewerStats
from engine.persona import Persona
from memory.store import Store, TimelinePoint

TREND_WINDOW = timedelta(days=7)
TREND_EPSILON = 0.5


def trend(points: list[TimelinePoint]) -> str:
    """rising / falling / steady: intimacy now against a week before the last interaction."""
    if len(points) < 2:
        return "steady"
    latest = points[-1]
    earlier = [p for p in points if p.at <= latest.at - TREND_WINDOW]
    baseline = earlier[-1] if earlier else points[0]
    delta = latest.intimacy - baseline.intimacy
    if delta > TREND_EPSILON:
        return "rising"
    if delta < -TREND_EPSILON:
        return "falling"
    return "steady"


async def user_stats(store: Store, persona: Persona, platform: str,
                     platform_user_id: str) -> ViewerStats | None:
    stats = await store.stats(platform, platform_user_id, persona.id, persona.moods.baseline)
    if stats is None:
        return None
    points = await store.state_timeline(stats["user_id"], persona.id)
    return ViewerStats(**stats, intimacy_tier=persona.tier_for(stats["intimacy_level"]).name,
                       intimacy_trend=trend(points))


_MOOD_COLOURS = [(93, 173, 226), (244, 208, 63), (231, 76, 60), (142, 68, 173),
                 (46, 204, 113), (230, 126, 34), (149, 165, 166)]


def render_chart(points: list[TimelinePoint], moods: list[str], width: int = 480,
                 height: int = 200) -> bytes:
    """Intimacy (0–100) as a line over the user's interactions, each dot coloured by mood."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (width, height), (24, 26, 33))
    draw = ImageDraw.Draw(image)
    left, right, top, bottom = 36, width - 10, 10, height - 24
    for level in (0, 25, 50, 75, 100):
        y = bottom - (bottom - top) * level / 100
        draw.line([(left, y), (right, y)], fill=(55, 58, 70))
        draw.text((4, y - 6), str(level), fill=(160, 160, 170))
    if points:
        step = (right - left) / max(1, len(points) - 1)
        xy = [(left + i * step, bottom - (bottom - top) * p.intimacy / 100)
              for i, p in enumerate(points)]
        if len(xy) > 1:
            draw.line(xy, fill=(236, 240, 241), width=2)
        for (x, y), point in zip(xy, points, strict=True):
            index = moods.index(point.mood) if point.mood in moods else -1
            colour = _MOOD_COLOURS[index % len(_MOOD_COLOURS)]
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
    legend_x = left
    for index, mood in enumerate(moods):
        colour = _MOOD_COLOURS[index % len(_MOOD_COLOURS)]
        draw.rectangle([legend_x, height - 16, legend_x + 8, height - 8], fill=colour)
        draw.text((legend_x + 11, height - 19), mood, fill=(200, 200, 210))
        legend_x += 16 + 7 * len(mood)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


async def user_chart(store: Store, persona: Persona, platform: str,
                     platform_user_id: str) -> bytes | None:
    user_id = await store.find_user(platform, platform_user_id)
    if user_id is None:
        return None
    points = await store.state_timeline(user_id, persona.id)
    return render_chart(points, list(persona.moods.states))


async def reply_trace(store: Store, message_id: int) -> ReplyTrace | None:
    """The stored trace of a reply, given its id or the id of the question it answers."""
    message = await store.get_message(message_id)
    if message is not None and message.role == "user":
        message = await store.reply_to(message.id)
    if message is None or message.trace is None:
        return None
    return ReplyTrace(message_id=message.id, reply_to=message.reply_to_id,
                      channel_id=message.channel_id, content=message.content,
                      trace=message.trace)
