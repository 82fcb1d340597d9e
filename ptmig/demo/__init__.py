"""`ptmig demo`: the main job, end to end on one machine.

A source and a destination VMM (separate processes, loopback), a kv guest with a passthrough
virtio-net and virtio-blk, a load client that checks every acknowledged value, and a live
migration with page-by-page verification; then a summary that says whether anything was lost.

- `plan`: options, ports, the generated VM config
- `procs`, `tapnet`: child processes, the optional TAP network (QMP: `ptmig.vmmproc`)
- `loadproc`: the load client's own process
- `run`: the orchestration (`run_demo`)
- `timeline`, `summary`: pure functions over the demo document (phases, throughput, verdict)
- `live`: the live view
"""

from .plan import DemoOptions
from .run import DemoOutcome, run_demo
from .summary import Verdict, summary_lines, verdict

__all__ = ["DemoOptions", "DemoOutcome", "Verdict", "run_demo", "summary_lines", "verdict"]
