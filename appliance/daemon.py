"""`python -m appliance serve`: the composition root that builds the daemon's parts and runs them.

Each part has one job, in a module named for it:

- `gatewaystate`: the state (the one writer of the state file) and the schedule in force;
- `keyissuer`: activation keys, for port 80 and the local API alike;
- `uploads`: the local API's uploads, forwarded through the one shaper;
- `linkloop`: the long-poll of the control plane, folded into the state;
- `hypervisoragent`: hypervisor tests and inventory syncs the control plane asks for;
- `jobrunner` (+ `joblink`, `backupjob`, `restorejob`): the backup and restore jobs the
  control plane gives the gateway, their chunks sent through the same shaper;
- `updateagent`: software updates, at once or in the maintenance window, handed to the
  root installer (`updateinstall`) through `updatefiles`;
- `statusview`: what the local API shows;
- `listeners`: the port-80 sockets serving the activation page;
- `clockwatch`: a step of the wall clock, so the shaper re-reads it;
- `localapi`: the console's API, given only the callables it needs (`localapi.Backend`).

`Daemon.create` reads the identity and the state first and only then builds the parts, each
with everything it needs: a Daemon is whole once constructed. `run` starts the parts as tasks
of one event loop (none of them can block another) and stops them in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import signal
import time
from typing import Any

from appliance import identity as identity_mod
from appliance import localapi, sdnotify, sealkey
from appliance.activation import ActivationServer
from appliance.clockwatch import ClockWatch
from appliance.config import Settings
from appliance.gatewaystate import GatewayState
from appliance.hypervisoragent import HypervisorAgent
from appliance.hypervisors import connector_for
from appliance.joblink import JobLink
from appliance.jobrunner import JobRunner
from appliance.keyissuer import KeyIssuer
from appliance.link import LinkClient
from appliance.linkloop import LinkLoop
from appliance.listeners import Listeners
from appliance.shaping import ScheduledShaper
from appliance.startup import StartupError
from appliance.state import StateStore
from appliance.statusview import StatusView
from appliance.updateagent import UpdateAgent
from appliance.uploads import Uploads
from appliance.version import __version__
from gatewaycore.connguard import quiet_resource_errors

__all__ = ["Daemon", "StartupError"]  # StartupError: what `serve` reports in one line

log = logging.getLogger(__name__)


class Daemon:
    """The daemon's parts, built together by `create`, run and stopped together by `run`."""

    def __init__(
        self,
        settings: Settings,
        identity: identity_mod.Identity,
        shaper: ScheduledShaper,
        gateway: GatewayState,
        link: LinkClient,
        link_loop: LinkLoop,
        keys: KeyIssuer,
        uploads: Uploads,
        views: StatusView,
        listeners: Listeners,
        clock: ClockWatch,
        hypervisors: HypervisorAgent,
        job_link: JobLink,
        jobs: JobRunner,
        updates: UpdateAgent,
    ) -> None:
        self.settings = settings
        self.identity = identity
        self.shaper = shaper
        self.gateway = gateway
        self.link = link
        self.link_loop = link_loop
        self.keys = keys
        self.uploads = uploads
        self.views = views
        self.listeners = listeners
        self.clock = clock
        self.hypervisors = hypervisors
        self.job_link = job_link
        self.jobs = jobs
        self.updates = updates
        self._stop = asyncio.Event()

    @classmethod
    def create(cls, settings: Settings) -> Daemon:
        """Read (or create) the identity and the state, then build every part.

        StartupError names a bad identity file or state directory; StateError a bad state
        file (cli prints either in one line and exits 1).
        """
        state_dir = settings.state_dir
        try:
            state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            raise StartupError(f"cannot create state_dir {state_dir}: {exc.strerror}") from None
        try:
            identity, created = identity_mod.load_or_create(state_dir)
        except identity_mod.IdentityError as exc:
            raise StartupError(str(exc)) from None
        if created:
            log.info("event=identity_created key_id=%s", identity.key_id)
        try:
            seal, seal_created = sealkey.load_or_create(state_dir)
        except sealkey.SealKeyError as exc:
            raise StartupError(str(exc)) from None
        if seal_created:
            log.info("event=seal_key_created seal_key=%s", seal.public_b64)
        store = StateStore(state_dir)
        store.load()  # StateError propagates
        shaper = ScheduledShaper()
        gateway = GatewayState(store, shaper)
        url = settings.control_plane_url
        link = LinkClient(url, identity, seal.public_b64)
        ca_file = settings.hypervisor_ca_file
        hypervisors = HypervisorAgent(
            gateway, link, seal,
            connect=functools.partial(connector_for,
                                      ca_file=None if ca_file is None else str(ca_file)))
        job_link = JobLink(url, identity, shaper)
        jobs = JobRunner(job_link, hypervisors.backup_connector)
        updates = UpdateAgent(gateway, link.fetch_update, jobs, state_dir,
                              settings.update_result_file)
        link_loop = LinkLoop(link, gateway, settings.link_retry_max, hypervisors.offer,
                             jobs.offer, updates.offer, updates.report)
        keys = KeyIssuer(link, gateway, wake_poll=link_loop.wake)
        return cls(
            settings=settings,
            identity=identity,
            shaper=shaper,
            gateway=gateway,
            link=link,
            link_loop=link_loop,
            keys=keys,
            uploads=Uploads(url, identity, gateway, shaper, wake_poll=link_loop.wake),
            views=StatusView(identity, link, gateway, shaper, url,
                             syncing=lambda: hypervisors.syncing, jobs=jobs.summary,
                             update=updates.view),
            listeners=Listeners(settings.listen, ActivationServer(keys.issue)),
            clock=ClockWatch(lambda _step: gateway.resync_clock("watcher")),
            hypervisors=hypervisors,
            job_link=job_link,
            jobs=jobs,
            updates=updates,
        )

    def local_api(self) -> localapi.Backend:
        """The narrow view of the daemon the local API is given."""
        return localapi.Backend(
            status=self.views.status,
            schedule=self.views.schedule,
            shaping=self.views.shaping,
            issue_key=self.keys.issue,
            upload_refusal=self.uploads.refusal,
            upload=self.uploads.upload,
            default_region=self.views.default_region,
            clock_stepped=self.clock_stepped,
            test_hypervisor=self.hypervisors.test_now,
            jobs=self.jobs.view,
            control_plane_host=self.settings.control_plane_host,
            control_plane_port=self.settings.control_plane_port,
        )

    def clock_stepped(self) -> dict[str, Any]:
        """The console stepped the wall clock: re-read it now; the shaping in force after.

        The watcher is rebased too: the step is dealt with, it need not be seen twice.
        """
        self.gateway.resync_clock("api")
        self.clock.rebase()
        return self.views.shaping()

    async def run(self) -> None:
        """Start every part, serve until `stop` (or SIGTERM/SIGINT), then stop them in order."""
        settings = self.settings
        quiet_resource_errors(asyncio.get_running_loop())  # port 80 under a flood: one line
        self.shaper.start()
        tasks: list[asyncio.Task[None]] = []
        async with contextlib.AsyncExitStack() as parts:
            # Closed in reverse: uploads' session, job link, link, shaper, local API,
            # listeners, tasks (the jobs among them).
            parts.push_async_callback(self.uploads.close)
            parts.push_async_callback(self.job_link.close)
            parts.push_async_callback(self.link.close)
            parts.callback(self.shaper.close)
            bound = await self.listeners.start()
            parts.callback(self.listeners.close)
            runner = await localapi.start(self.local_api(), settings.local_api_socket)
            parts.push_async_callback(runner.cleanup)
            tasks.append(asyncio.create_task(self.link_loop.run(), name="poll"))
            tasks.append(asyncio.create_task(self.clock.run(), name="clockwatch"))
            tasks.append(asyncio.create_task(self.hypervisors.run(), name="hypervisors"))
            tasks.append(asyncio.create_task(self.updates.run(), name="updates"))
            parts.push_async_callback(self._cancel, tasks)

            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self._stop.set)
            st = self.gateway.state
            # cpu: what the start cost this process (imports most of it): the boot's figure to
            # watch under QEMU's TCG (docs/image.md, "Boot")
            log.info(
                "event=ready version=%s key_id=%s listen=%s local_api=%s control_plane=%s "
                "activated=%s deleted=%s cpu=%.2fs",
                __version__, self.identity.key_id, ",".join(bound), settings.local_api_socket,
                settings.control_plane_url, str(st.activated).lower(), str(st.deleted).lower(),
                time.process_time(),
            )
            sdnotify.notify("READY=1")  # systemd starts the units that wait for us now
            try:
                await self._stop.wait()
            finally:
                log.info("event=stopping")
                sdnotify.notify("STOPPING=1")

    def stop(self) -> None:
        self._stop.set()

    async def _cancel(self, tasks: list[asyncio.Task[None]]) -> None:
        # Uploads in flight are cut (the control plane keeps nothing of a cut upload), so a
        # slow shaped upload never holds up the stop.
        for task in tasks:
            task.cancel()
        self.uploads.cancel()
        await self.hypervisors.close()
        await asyncio.gather(*tasks, return_exceptions=True)
        # No poll runs now, so no list restarts a job: each stops quietly, ends its session
        # on the hypervisor, and is given back by the control plane after the restart.
        await self.jobs.close()
