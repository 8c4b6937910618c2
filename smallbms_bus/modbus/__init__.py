"""Modbus TCP server bound to register_maps/ (REGISTERS.md)."""
