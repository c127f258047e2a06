"""Run folders: output layout, metadata and resume (``folder``), prompt sets (``prompts``), multi-host
set-up (``distributed``), atomic file writes and locks (``files``) and checkpoint fingerprints."""
