"""What the snapshot and pause tests leave in a sandbox and look for afterwards: files (a
10 MB blob with its checksum, a note) and a process only memory keeps."""

from __future__ import annotations

WRITE = (
    "head -c 10000000 /dev/urandom > /home/user/blob && sha256sum /home/user/blob | cut -c1-64"
    " > /home/user/blob.sum && echo kept > /home/user/note"
)
#: prints "kept" when the files are there and whole
CHECK = "sha256sum /home/user/blob | cut -c1-64 | cmp - /home/user/blob.sum && cat /home/user/note"
#: a process that only memory keeps: nothing on disk would start it again
BACKGROUND = "setsid sleep 100000 </dev/null >/dev/null 2>&1 &"
STILL_RUNNING = "pgrep -x sleep >/dev/null && echo running || echo gone"
