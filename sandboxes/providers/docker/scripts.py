"""The shell the provider runs inside sandboxes, kept to what busybox ``sh`` and ``dash`` both accept."""

RUN_DIR = "/run/deputies"  # tmpfs owned by the sandbox user: one pid file per running exec

# PID 1: sleeps forever and, being a shell, reaps the orphans that exec leaves to it.
PID1_SCRIPT = "trap 'exit 0' TERM; while :; do sleep 2147483647 & wait $!; done"

# $1 = token, then argv. The command gets its own session so its whole process group can be killed.
EXEC_SCRIPT = r"""t=$1; shift
f=/run/deputies/$t
if command -v setsid >/dev/null 2>&1; then setsid "$@" & else "$@" & fi
p=$!
echo "$p" >"$f"
wait "$p" 2>/dev/null
c=$?
kill -9 -"$p" 2>/dev/null
rm -f "$f"
set -- /run/deputies/*
[ -e "$1" ] || rm -rf /tmp/* /tmp/.[!.]* /tmp/..?* 2>/dev/null
exit "$c"
"""

# $1 = token of the exec to kill. Without its pid file (the command removed it, or has not written
# it within three seconds) every process of the sandbox user except PID 1 is killed.
KILL_SCRIPT = r"""f=/run/deputies/$1
i=0
while [ ! -s "$f" ] && [ "$i" -lt 60 ]; do sleep 0.05; i=$((i+1)); done
if [ -s "$f" ]; then p=$(cat "$f"); kill -9 -"$p" 2>/dev/null || kill -9 "$p" 2>/dev/null
else kill -9 -1 2>/dev/null; fi
exit 0
"""

# realpath -m for each absolute path argument, in portable sh: symlinks are followed (at most 40),
# ".." applies to the resolved parent, missing components are kept. Prints, NUL-separated, the
# resolved path, its kind (d, f, x = executable file, o = other, - = missing, loop) and the deepest
# existing directory on it.
RESOLVE_SCRIPT = r"""for a in "$@"; do
  r=/ rest=$a n=0
  while [ -n "$rest" ]; do
    case $rest in
      */*) c=${rest%%/*}; rest=${rest#*/} ;;
      *) c=$rest; rest= ;;
    esac
    case $c in
      ''|.) continue ;;
      ..) r=${r%/*}; [ -n "$r" ] || r=/; continue ;;
    esac
    if [ "$r" = / ]; then p=/$c; else p=$r/$c; fi
    if [ -L "$p" ]; then
      n=$((n+1))
      t=$(readlink "$p" && echo x) || t=
      if [ "$n" -gt 40 ] || [ -z "$t" ]; then r=; break; fi
      t=${t%?x}
      case $t in /*) r=/ ;; esac
      rest=$t/$rest
    else
      r=$p
    fi
  done
  if [ -z "$r" ]; then k=loop; d=/
  else
    if [ -d "$r" ]; then k=d
    elif [ -f "$r" ]; then if [ -x "$r" ]; then k=x; else k=f; fi
    elif [ -e "$r" ]; then k=o
    else k=-; fi
    d=$r
    while [ ! -d "$d" ]; do d=${d%/*}; [ -n "$d" ] || d=/; done
  fi
  printf '%s\000%s\000%s\000' "$r" "$k" "$d"
done
"""

# Files under $1 (not directories), without descending into .git directories or symlinks.
FIND_SCRIPT = 'find "$1" -mindepth 1 -name .git -type d -prune -o ! -type d -print0'
