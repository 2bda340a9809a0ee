"""A manager's habits: check what a screen may do, and force-release a stuck screen's lock."""

from __future__ import annotations

from .screen import Screen


class ManagerScreen(Screen):
    async def habit(self) -> None:
        mirror = self.mirrors.get(self.store_channel)
        if mirror is None or not mirror.tokens or self.rng.random() < 0.3:
            self.run.stats.ops["manager.check"] += 1
            open_orders = self.store.open_orders()
            if open_orders:
                await self.req("check", order_id=self.rng.choice(open_orders),
                               action=self.rng.choice(["edit", "pay", "presettle"]))
            return
        self.run.stats.ops["manager.force_release"] += 1
        order_id, kind = self.rng.choice(sorted(mirror.tokens))
        await self.req("lock.release", order_id=order_id, kind=kind, force=True,
                       operator="manager", reason="chaos: stuck screen")
