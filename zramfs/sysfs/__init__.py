"""What the trio thread serves: the devices and their attributes (device, and device_tiering
for writeback and recompression), hot_add and hot_remove (hotplug), the tree that mirrors
/dev and /sys (control), the restart record the devices keep (record), the kernel's number
parsing (kstrto) and attribute syntax (tiering_args), a signalled writer's interrupt
(interrupts), and opening the files an operator names (files)."""
