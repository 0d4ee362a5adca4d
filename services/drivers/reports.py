"""When a node's hosts report, and whether a host changed enough to report early.

Pure logic, no broker, no clock of its own: the worker's monitor loop asks a
``ReportSchedule`` which hosts are due and tells it when each reported.

A worker serving many hosts (the simulator) must not send every host's report
at the same instant every interval: lifecycle would get thousands of reports in
one burst, then nothing. So the first reports are spread over a short ramp
(``RAMP_RATE`` hosts a second, never longer than one interval), the second
ones evenly over the whole next interval, and each later one comes one interval
after the last, give or take ``jitter`` (a share of the interval), so the phases
never fall back into step. One host with no jitter reports at once, then every
interval, as it always has.
"""
import heapq
import random

RAMP_RATE = 100             # first reports a second when a worker starts many hosts
URGENT_GAP = 0.5            # seconds between two early reports of one host
# a report is sent early when a domain came, went or changed state, or used memory or
# datastore space moved by this share of the host's total since the last report; CPU,
# which swings by itself, by the larger share
CHANGE_SHARE = 0.1
CPU_CHANGE_SHARE = 0.25


class ReportSchedule:
    """Due times of ``count`` hosts' reports, by host index."""

    def __init__(self, count, interval, now, jitter=0.0, rng=None):
        if interval <= 0:
            raise ValueError(f"monitor interval: must be more than 0 s, got {interval!r}")
        if not 0 <= jitter < 1:
            raise ValueError(f"monitor jitter: must be at least 0 and below 1, got {jitter!r}")
        self.count, self.interval, self.jitter = count, interval, jitter
        self.rng = rng or random.Random()
        ramp = min(interval, count / RAMP_RATE) if count > 1 else 0.0
        self.reported = [0] * count         # reports sent by each host
        self.last = [None] * count          # when each host last reported
        self.scheduled = [now + ramp * index / count for index in range(count)]
        self.heap = [(at, index) for index, at in enumerate(self.scheduled)]
        heapq.heapify(self.heap)     # entries no longer in ``scheduled`` are stale, skipped
        self.urgent = {}                    # host index -> earliest time of its early report

    def next_after(self, index, now):
        """When host ``index``, reporting now, reports next."""
        if self.reported[index] == 1 and self.count > 1:
            # after the ramp: spread evenly over the next interval
            return now + self.interval * (0.5 + (index + 0.5) / self.count)
        spread = self.rng.uniform(-self.jitter, self.jitter) if self.jitter else 0.0
        return now + self.interval * (1 + spread)

    def hurry(self, index, now):
        """Ask for an early report of host ``index``, at most one per URGENT_GAP."""
        last = self.last[index]
        at = now if last is None else max(now, last + URGENT_GAP)
        self.urgent[index] = min(at, self.urgent.get(index, at))

    def due(self, now):
        """The hosts to report now (each once), in index order."""
        hosts = {index for index, at in self.urgent.items() if at <= now}
        while self.heap and self.heap[0][0] <= now:
            at, index = heapq.heappop(self.heap)
            if self.scheduled[index] == at:
                hosts.add(index)
        return sorted(hosts)

    def done(self, index, now):
        """Host ``index`` reported at ``now``: schedule its next report."""
        self.urgent.pop(index, None)
        self.reported[index] += 1
        self.last[index] = now
        self.scheduled[index] = self.next_after(index, now)
        heapq.heappush(self.heap, (self.scheduled[index], index))

    def wake_at(self):
        """When the next report falls due (None: nothing scheduled)."""
        while self.heap and self.scheduled[self.heap[0][1]] != self.heap[0][0]:
            heapq.heappop(self.heap)
        times = list(self.urgent.values()) + ([self.heap[0][0]] if self.heap else [])
        return min(times) if times else None


def domain_states(report):
    return {vm.get("VM_ID"): vm.get("STATE") for vm in report.get("VMS") or []}


def _moved(previous, current, used, total, share=CHANGE_SHARE):
    if not previous.get(total):
        return False
    return abs(current.get(used, 0) - previous.get(used, 0)) >= share * previous[total]


def significant_change(previous, current):
    """Whether ``current`` says something the last report sent (``previous``)
    did not: a domain appeared, disappeared or changed state, or used memory
    or datastore space moved by CHANGE_SHARE of the host's total, or used CPU
    by CPU_CHANGE_SHARE."""
    if previous is None:
        return True
    return (domain_states(previous) != domain_states(current)
            or _moved(previous, current, "USEDMEMORY", "TOTALMEMORY")
            or _moved(previous, current, "USEDCPU", "TOTALCPU", CPU_CHANGE_SHARE)
            or _moved(previous, current, "DS_LOCATION_USED_MB", "DS_LOCATION_TOTAL_MB"))
