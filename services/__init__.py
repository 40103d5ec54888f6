"""The three tunewire services, one folder each, and what they share (common/)."""
