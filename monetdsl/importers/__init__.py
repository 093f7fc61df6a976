"""Readers for graphs published in other tools' formats."""
from .checkmate import load_node_link, network_from_node_link, node_link_from_network

__all__ = ["load_node_link", "network_from_node_link", "node_link_from_network"]
