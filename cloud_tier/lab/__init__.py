"""Lab tools around the cloud node, for tests, benchmarks and the demo; nothing in the serving node imports them.

- `cloud_tier.lab.linkproxy`: `LinkProxy`, a TCP proxy that emulates a network link (rate, delay, jitter, loss,
  outages) on loopback.
- `cloud_tier.lab.process`: `CloudProcess`, `split-cloud serve` in a child process (kill tests, benchmarks).
- `cloud_tier.lab.emulate`: `split-emulate`, a command run as an emulated edge device (cgroup CPU share, cores,
  memory; presets calibrated to the device table; a link proxy with network profiles on a schedule).
- `cloud_tier.lab.demo`: `split-demo`, the whole system on one machine, its devices emulated.
"""
