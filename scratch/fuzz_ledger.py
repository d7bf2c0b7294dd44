"""Random interleavings of grouped and synchronous ledger operations, with failing writes, against real SQLite.
After every round: the store holds exactly the durable leases memory holds; no service holds more than
max_concurrent leases of a kind; every request was answered; idle times flushed match the rule."""
import asyncio, random, sqlite3, sys, tempfile
from datetime import timedelta
from pathlib import Path
from reconciler.core.snapshot import Lease, Demand, Instance
from reconciler.errors import StoreError
from reconciler.runtime.ledger import Ledger
from reconciler.store import SqliteStore
from reconciler.testing.clock import T0, FakeClock

class Breaking(SqliteStore):
    fail = set()
    def put_lease(self, lease, *, demand_id=None, now=None):
        if lease.id in self.fail: raise StoreError("injected put "+lease.id)
        super().put_lease(lease, demand_id=demand_id, now=now)
    idle_fails = False
    def set_idle_since(self, service, when):
        if self.idle_fails: raise StoreError("injected idle")
        return super().set_idle_since(service, when)
    def release_lease(self, lease_id):
        if lease_id in self.fail: raise StoreError("injected release "+lease_id)
        return super().release_lease(lease_id)

MAX = 2
TRACE = False
def main(seed):
    rnd = random.Random(seed)
    d = Path(tempfile.mkdtemp())
    store = Breaking(d/"state.db", FakeClock()); store.fail = set()
    for svc in 'ab':
        store.put_instance(Instance(service=svc, origin='adopted', idle_since=T0 - timedelta(days=1)))
    ledger = Ledger(store, FakeClock())
    n = [0]
    async def round_():
        futs = []
        for _ in range(rnd.randint(1, 8)):
            op = rnd.choice(["gd", "rd", "g", "r", "mo", "renew", "expire", "flush", "demand"])
            svc = rnd.choice(["a", "b"])
            n[0] += 1; lid = f"L{n[0]}"
            if rnd.random() < 0.15: store.fail.add(lid)
            held = [l.id for l in ledger.leases()]
            if rnd.random() < 0.1 and held: store.fail.add(rnd.choice(held))
            if TRACE: print('op', op, svc, lid, sorted(store.fail), held)
            try:
                if op == "gd":
                    futs.append(asyncio.ensure_future(ledger.grant_durably(Lease(id=lid, service=svc, holder="h",
                        expires_at=T0 + timedelta(seconds=rnd.choice([1, 100]))), MAX, now=T0)))
                elif op == "rd" and held:
                    futs.append(asyncio.ensure_future(ledger.release_durably(rnd.choice(held), T0)))
                elif op == "g":
                    ledger.grant(Lease(id=lid, service=svc, holder="h"), MAX, now=T0)
                elif op == "r" and held:
                    ledger.release(rnd.choice(held), T0)
                elif op == "mo":
                    ledger.grant(Lease(id=lid, service=svc, holder="gw"), MAX, now=T0, durable=False)
                elif op == "renew" and held:
                    ledger.renew(rnd.choice(held), T0 + timedelta(seconds=50))
                elif op == "expire":
                    ledger.expire(T0 + timedelta(seconds=5))
                elif op == "flush":
                    ledger.flush()
                elif op == "demand":
                    ledger.add_demand(Demand(id=lid, service=svc, holder="h", requested_at=T0))
            except StoreError:
                pass
            store.idle_fails = rnd.random() < 0.1
            if rnd.random() < 0.05 and futs:
                futs[-1].cancel()
            if rnd.random() < 0.5:
                await asyncio.sleep(rnd.choice([0, 0, 0.06]))
        if TRACE: print('-- wait')
        store.idle_fails = False
        res = await asyncio.wait_for(asyncio.gather(*futs, return_exceptions=True), 2)
        for r in res:
            if isinstance(r, BaseException) and not isinstance(r, (StoreError, asyncio.CancelledError)): raise r
        store.fail.clear()
    async def run():
        for _ in range(30):
            await round_()
            ledger.flush()
            mem = {l.id for l in ledger.leases() if not ledger.memory_only(l.id)}
            with sqlite3.connect(store.path) as c:
                dur = {r[0] for r in c.execute("SELECT id FROM leases")}
            assert mem == dur, (seed, mem ^ dur)
            for svc in "ab":
                assert len(ledger.leases(svc)) <= MAX, (seed, ledger.leases(svc))
                busy = any(l.kind == 'service' for l in ledger.leases(svc))
                inst = store.get_instance(svc)
                shown = ledger.idle_since(inst)
                assert (inst.idle_since is None) == busy, (seed, svc, busy, inst.idle_since, ledger.leases(svc))
                assert shown == inst.idle_since
    asyncio.run(run())
    store.close()

if len(sys.argv) > 2:
    TRACE = True; main(int(sys.argv[2]))
for seed in range(int(sys.argv[1]) if len(sys.argv) > 1 else 200):
    main(seed)
print("ok")
