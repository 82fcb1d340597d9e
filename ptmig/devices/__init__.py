"""Devices: the virtio transport and queue core (`virtio/`) and the device processes that play
the part of passthrough hardware, DMAing into guest RAM through the IOMMU (`ptmig.iommu`)."""
