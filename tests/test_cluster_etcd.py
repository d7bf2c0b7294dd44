"""The etcd client (reconciler.cluster.etcd) against a real etcd: kv, txn, leases, watch, failover, TLS, users."""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from reconciler.cluster.etcd import (
    Compare,
    Delete,
    Etcd,
    EtcdAuthError,
    EtcdRequestError,
    EtcdUnavailable,
    Get,
    Put,
    Tls,
)
from reconciler.testing.ports import free_port
from tests.cluster_support import EtcdCluster, etcd_binary, make_tls


@pytest.fixture(autouse=True)
def _needs_etcd() -> None:
    etcd_binary()  # skips, saying how to install it, where there is no etcd


@pytest.fixture(scope="module")
def etcd3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    etcd_binary()
    cluster = EtcdCluster(tmp_path_factory.mktemp("etcd3"), size=3).start()
    try:
        yield cluster
    finally:
        cluster.stop()


def run(coro: object) -> object:
    return asyncio.run(coro)  # type: ignore[arg-type]


def test_kv_range_prefix_txn_delete(etcd3: EtcdCluster) -> None:
    async def go() -> None:
        etcd = Etcd(etcd3.urls)
        try:
            rev = await etcd.put("/t/kv/a", json.dumps({"n": 1}))
            await etcd.put("/t/kv/b", b"\xff\x00binary")
            await etcd.put("/t/kw", "outside the prefix")
            found = await etcd.range("/t/kv/", prefix=True)
            assert [kv.key for kv in found.kvs] == ["/t/kv/a", "/t/kv/b"]
            assert found.kvs[0].json() == {"n": 1} and found.kvs[1].value == b"\xff\x00binary"
            a = found.kvs[0]
            assert a.mod_revision == rev and found.revision >= rev
            ok, _ = await etcd.txn([Compare("/t/kv/a", "MOD", a.mod_revision)], [Put("/t/kv/a", "2")])
            assert ok
            again, _ = await etcd.txn([Compare("/t/kv/a", "MOD", a.mod_revision)], [Put("/t/kv/a", "3")],
                                      [Put("/t/kv/lost", "x")])
            assert not again  # the loser of a compare-and-swap: failure ops ran, success ops did not
            assert (await etcd.get("/t/kv/a")).value == b"2"  # type: ignore[union-attr]
            assert await etcd.get("/t/kv/lost") is not None
            ok, _ = await etcd.txn([Compare("/t/kv/none", "CREATE", 0)], [Delete("/t/kv/", prefix=True)])
            assert ok and (await etcd.range("/t/kv/", prefix=True)).kvs == []
            assert await etcd.get("/t/kw") is not None
        finally:
            await etcd.close()

    run(go())


def test_lease_keys_vanish_when_it_expires_and_keepalive_says_gone(etcd3: EtcdCluster) -> None:
    async def go() -> None:
        etcd = Etcd(etcd3.urls)
        try:
            lease = await etcd.grant(2)
            await etcd.put("/t/lease/x", "v", lease=lease)
            assert await etcd.keepalive(lease) == 2
            assert (await etcd.get("/t/lease/x")).lease == lease  # type: ignore[union-attr]
            await etcd.revoke(lease)
            assert await etcd.get("/t/lease/x") is None
            assert await etcd.keepalive(lease) == 0
            await etcd.revoke(lease)  # again: already gone is fine
        finally:
            await etcd.close()

    run(go())


def test_watch_streams_puts_and_deletes_from_a_revision(etcd3: EtcdCluster) -> None:
    async def go() -> None:
        etcd = Etcd(etcd3.urls)
        try:
            start = await etcd.put("/t/watch/a", "1")
            await etcd.delete("/t/watch/a")
            seen: list[tuple[str, str]] = []

            async def collect() -> None:
                async for batch in etcd.watch("/t/watch/", start):
                    seen.extend((e.kind, e.kv.key) for e in batch)
                    if len(seen) >= 3:
                        return

            task = asyncio.ensure_future(collect())
            await asyncio.sleep(0.2)
            await etcd.put("/t/watch/b", "2")
            await asyncio.wait_for(task, 5)
            assert seen == [("PUT", "/t/watch/a"), ("DELETE", "/t/watch/a"), ("PUT", "/t/watch/b")]
        finally:
            await etcd.close()

    run(go())


def test_failover_to_the_next_member_and_unavailable_when_none_answers(tmp_path: Path) -> None:
    cluster = EtcdCluster(tmp_path, size=3).start()
    try:
        async def go() -> None:
            dead = f"http://127.0.0.1:{free_port()}"  # nobody listens there
            etcd = Etcd([dead, *cluster.urls], timeout_s=1.0)
            try:
                await etcd.put("/t/f", "1")
                assert etcd.endpoints[etcd._current] == cluster.urls[0]
                cluster.kill(0)  # one of three: quorum holds, the client moves on (after an election, if m0 led)
                for _ in range(20):
                    try:
                        await etcd.put("/t/f", "2")
                        break
                    except EtcdUnavailable:  # retryable: an election in progress (slow on a loaded machine)
                        await asyncio.sleep(0.5)
                assert (await etcd.get("/t/f")).value == b"2"  # type: ignore[union-attr]
                cluster.kill(1)  # two of three: no quorum; the last member cannot answer a write
                with pytest.raises(EtcdUnavailable):
                    await etcd.put("/t/f", "3")
                # nor a linearizable read: a txn that writes nothing but reads a key (a placement's confirmation)
                with pytest.raises(EtcdUnavailable):
                    await etcd.txn([Compare("/t/f", "VALUE", b"2")], [Get("/t/f")])
                # while a txn of compares alone is answered from the member's own state, quorum or not: why the
                # confirmation reads a key
                ok, _ = await etcd.txn([Compare("/t/f", "VALUE", b"2")], [])
                assert ok
            finally:
                await etcd.close()

        run(go())
    finally:
        cluster.stop()


def test_bad_endpoint_is_a_clear_error() -> None:
    with pytest.raises(EtcdRequestError, match="not a URL"):
        Etcd(["127.0.0.1:2379"])
    with pytest.raises(EtcdRequestError, match="no etcd endpoint"):
        Etcd([])


def test_tls_member_with_client_certificates(tmp_path: Path) -> None:
    tls = make_tls(tmp_path / "pki")
    cluster = EtcdCluster(tmp_path / "data", size=1, tls=tls).start()
    try:
        async def go() -> None:
            etcd = Etcd(cluster.urls, tls=Tls(cacert=tls["cacert"], cert=tls["cert"], key=tls["key"]))
            try:
                await etcd.put("/t/tls", "secure")
                assert (await etcd.get("/t/tls")).value == b"secure"  # type: ignore[union-attr]
            finally:
                await etcd.close()
            anonymous = Etcd(cluster.urls, tls=Tls(cacert=tls["cacert"]), timeout_s=1.0)
            try:
                with pytest.raises((EtcdUnavailable, EtcdAuthError), match="etcd-cert"):  # (how TLS 1.3 says it varies)
                    await anonymous.put("/t/tls", "no client certificate")
            finally:
                await anonymous.close()

        run(go())
    finally:
        cluster.stop()


def test_user_and_password(tmp_path: Path) -> None:
    cluster = EtcdCluster(tmp_path, size=1).start()
    etcdctl = Path(etcd_binary()).with_name("etcdctl")
    if not etcdctl.exists():
        cluster.stop()
        pytest.skip("etcdctl is not installed (Debian: etcd-client): cannot enable auth for the test")
    try:
        ctl = [str(etcdctl), "--endpoints", cluster.urls[0]]
        env = {"ETCDCTL_API": "3", "PATH": "/usr/bin:/bin"}
        for args in (["user", "add", "root:rootpw"], ["user", "add", "node:s3cret"], ["role", "add", "rw"],
                     ["role", "grant-permission", "rw", "--prefix=true", "readwrite", "/reconciler/"],
                     ["user", "grant-role", "node", "rw"], ["auth", "enable"]):
            subprocess.run(ctl + args, check=True, capture_output=True, env=env)

        async def go() -> None:
            etcd = Etcd(cluster.urls, user="node", password="s3cret")
            try:
                await etcd.put("/reconciler/x", "1")
                assert (await etcd.get("/reconciler/x")).value == b"1"  # type: ignore[union-attr]
                with pytest.raises(EtcdAuthError, match="permission"):
                    await etcd.put("/elsewhere", "1")
            finally:
                await etcd.close()
            wrong = Etcd(cluster.urls, user="node", password="wrong")
            try:
                with pytest.raises(EtcdAuthError) as refused:
                    await wrong.put("/reconciler/x", "2")
                assert "wrong" not in str(refused.value)  # never the password
            finally:
                await wrong.close()

        run(go())
    finally:
        cluster.stop()


def test_a_placement_is_refused_only_on_what_etcd_holds_now_never_on_a_cache_behind_it(etcd3: EtcdCluster) -> None:
    """The placer's watch-kept view can lag behind etcd (a node that has just joined). A choice made on it that
    finds no node re-reads etcd before refusing, as a choice that loses its race does (seen once in CI: a lease
    on a one-node cluster answered 404 "unknown service" just after the node joined)."""
    from reconciler.cluster.node import ClusterNode, ClusterRefused, View

    async def go() -> None:
        etcd = Etcd(etcd3.urls)
        placer = ClusterNode(etcd, cluster="stale", node="a", advertise="127.0.0.1:1", api_url=lambda: None)
        try:
            offer = {"tier": "fit", "free_mb": 4000, "cost": [], "reason": ""}
            await etcd.put("/reconciler/stale/nodes/a", json.dumps({"url": "http://127.0.0.1:1"}))
            await etcd.put("/reconciler/stale/reservations/a", "{}")
            await etcd.put("/reconciler/stale/state/a", json.dumps({"services": {"embed": {
                "slots_free": 0, "model": None, "model_bound": False, "offer": offer}}}))
            placer._cached = View(0)  # what the watch had before node a's keys arrived
            placed = await placer.place("embed", None)
            assert placed.node == "a" and placed.local
            placer._cached = View(0)
            with pytest.raises(ClusterRefused) as refused:  # refused on the current view: nobody has it
                await placer.place("tts", None)
            assert refused.value.status == 404 and "unknown service 'tts'" in str(refused.value)
        finally:
            await etcd.close()

    run(go())
