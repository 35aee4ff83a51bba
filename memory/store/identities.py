"""Who is who: platform identities → users, created on first sight, linked across platforms."""

from __future__ import annotations

from typing import Any

from sqlalchemy import ColumnElement, and_, delete, func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from memory.errors import IntegrityViolation, StoreError
from memory.models import Identity, Memory, Message, RelationshipState, StateEvent, User
from memory.store.database import Database


def identity_is(platform: str, platform_user_id: str) -> ColumnElement[bool]:
    return and_(Identity.platform == platform, Identity.platform_user_id == platform_user_id)


class Identities:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def find_user(self, platform: str, platform_user_id: str) -> int | None:
        async with self._db.read() as session:
            return await session.scalar(
                select(Identity.user_id).where(identity_is(platform, platform_user_id)))

    async def resolve_user(self, platform: str, platform_user_id: str, display_name: str) -> int:
        """The user id behind a platform identity, created on first sight."""
        try:
            async with self._db.write() as session:
                user_id = await session.scalar(
                    select(Identity.user_id).where(identity_is(platform, platform_user_id)))
                if user_id is not None:
                    return user_id
                new_id = await _new_user(session, display_name)
                await session.execute(insert(Identity).values(
                    user_id=new_id, platform=platform, platform_user_id=platform_user_id,
                    display_name=display_name))
                return new_id
        except IntegrityViolation:
            pass  # another task created the same identity first; theirs wins
        found = await self.find_user(platform, platform_user_id)
        if found is None:
            raise StoreError(f"store: identity {platform}:{platform_user_id} vanished")
        return found

    async def link_identity(self, user_id: int, platform: str, platform_user_id: str,
                            display_name: str) -> int:
        """Attach a platform identity to ``user_id`` (e.g. a viewer's Twitch account to their
        Discord user). If that identity already had a user of its own, that user's messages,
        memories and audit rows move over and its relationship state is merged (conversation
        counts added, the higher intimacy kept), then the emptied user is deleted."""
        async with self._db.write() as session:
            old = await session.scalar(
                select(Identity.user_id).where(identity_is(platform, platform_user_id)))
            if old is None:
                await session.execute(insert(Identity).values(
                    user_id=user_id, platform=platform, platform_user_id=platform_user_id,
                    display_name=display_name))
                return user_id
            if old == user_id:
                return user_id
            # PostgreSQL: wait for transactions still adding rows for ``old`` (their foreign
            # keys hold key-share locks on it) and keep new ones out until this commits. The
            # moves below would miss rows committed after they started, and the delete at
            # the end would take those rows with it.
            await session.execute(select(User.id).where(User.id == old).with_for_update())
            for model in (Message, Memory, StateEvent):
                await session.execute(update(model).where(model.user_id == old)
                                      .values(user_id=user_id))
            await _merge_states(session, old, user_id)
            await session.execute(update(Identity).where(Identity.user_id == old)
                                  .values(user_id=user_id))
            await session.execute(delete(User).where(User.id == old))
            return user_id

    async def unlink_identity(self, platform: str, platform_user_id: str) -> int | None:
        """Give a linked identity a user of its own again (history stays where it is)."""
        async with self._db.write() as session:
            identity = (await session.execute(
                select(Identity.user_id, Identity.display_name)
                .where(identity_is(platform, platform_user_id)))).first()
            if identity is None:
                return None
            others = await session.scalar(select(func.count()).select_from(Identity).where(
                Identity.user_id == identity.user_id))
            if others == 1:
                return int(identity.user_id)  # not linked to anything
            new_id = await _new_user(session, identity.display_name)
            await session.execute(update(Identity).where(identity_is(platform, platform_user_id))
                                  .values(user_id=new_id))
            return new_id


async def _new_user(session: AsyncSession, display_name: str) -> int:
    added = await session.execute(
        insert(User).values(display_name=display_name).returning(User.id))
    return int(added.scalar_one())


async def _merge_states(session: AsyncSession, source: int, target: int) -> None:
    """Each persona's state of ``source`` becomes ``target``'s, or is merged into the one
    ``target`` has (conversation counts added, the higher intimacy kept)."""
    rows = (await session.execute(select(
        RelationshipState.id, RelationshipState.persona_id, RelationshipState.user_id,
        RelationshipState.conversation_count, RelationshipState.intimacy,
    ).where(RelationshipState.user_id.in_((source, target))))).all()
    by_persona: dict[str, dict[int, Any]] = {}
    for row in rows:
        by_persona.setdefault(row.persona_id, {})[row.user_id] = row
    states = RelationshipState
    for pair in by_persona.values():
        moved, kept = pair.get(source), pair.get(target)
        if moved is None:
            continue
        if kept is None:
            await session.execute(update(states).where(states.id == moved.id)
                                  .values(user_id=target))
            continue
        await session.execute(update(states).where(states.id == kept.id).values(
            conversation_count=kept.conversation_count + moved.conversation_count,
            intimacy=max(kept.intimacy, moved.intimacy), version=states.version + 1))
        await session.execute(delete(states).where(states.id == moved.id))
