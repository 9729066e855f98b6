"""The process: the daemon's start, serving and stop (daemon), the config and its devices' uses
over loop devices (config, uses, loop), what carries a live restart (fdstore: the service
manager's protocol; pidfile; reclaim and _keeper: memory held through a restart), the memory
budget and the metrics endpoint. The supervisor and the commands sit above it, in zramfs/."""
