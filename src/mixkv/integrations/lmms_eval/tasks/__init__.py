"""lmms-eval task folders shipped with mixkv (copied next to exported data by :mod:`..export`)."""
