# test/pg/cluster.sh — create, start and stop a throwaway PostgreSQL cluster
# with kimi_linear preloaded, run by an unprivileged OS user (PostgreSQL
# refuses to run as root).  Sourced by test/run-tests.sh, scripts/demo.sh and
# bench/bench-sql.sh.
#
#   KL_CLUSTER_DIR  where the cluster lives (default: <repo>/.test-cluster)
#   KL_PGUSER       the OS user that runs it (default: kltest; created if missing)
#   KL_PORT         port (default: a free one from 54330)
#   KL_MODEL_DIR    kimi_linear.model_dir (default: the installed one)
#   KL_EXTRA_CONF   more postgresql.conf lines
#   KL_PGBIN        the server's binaries (default: pg_config --bindir; kl_stage_pg
#                   points it at a staged copy)
#
# After kl_cluster_start: PGHOST, PGPORT, PGUSER are exported for psql & co.

KL_REPO=${KL_REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}
KL_CLUSTER_DIR=${KL_CLUSTER_DIR:-$KL_REPO/.test-cluster}
KL_PGUSER=${KL_PGUSER:-kltest}
KL_PGBIN=${KL_PGBIN:-$(pg_config --bindir)}

# kl_stage_pg ROOT: a private PostgreSQL installation under ROOT with this
# checkout's build installed into it (make install DESTDIR=ROOT), so that tests
# never touch the system's PostgreSQL and several checkouts can test at once.
# The server binaries are copied (PostgreSQL finds its share and lib
# directories relative to its own executable, after resolving links); the
# system's libraries and share files are linked, except kimi_linear's own.
kl_stage_pg() {
  local root=$1 bindir libdir sharedir
  bindir=$(pg_config --bindir); libdir=$(pg_config --pkglibdir); sharedir=$(pg_config --sharedir)
  rm -rf "$root"
  mkdir -p "$root$bindir" "$(dirname "$root$libdir")" "$(dirname "$root$sharedir")"
  cp -a "$bindir/." "$root$bindir/"
  cp -as "$libdir" "$root$(dirname "$libdir")/"
  cp -as "$sharedir" "$root$(dirname "$sharedir")/"
  rm -rf "$root$libdir"/kimi_linear*.so "$root$sharedir"/extension/kimi_linear* "$root$sharedir/kimi_linear"
  make -s -C "$KL_REPO" install DESTDIR="$root" >/dev/null || return 1
  chmod -R a+rX "$root"
  KL_PGBIN=$root$bindir
}

# run a command as the cluster's OS user (directly when we are that user)
kl_as_user() {
  if [ "$(id -un)" = "$KL_PGUSER" ]; then "$@"; else runuser -u "$KL_PGUSER" -- "$@"; fi
}

kl_ensure_user() {
  if [ "$(id -u)" = 0 ] && ! id "$KL_PGUSER" >/dev/null 2>&1; then
    useradd --system --user-group --no-create-home --shell /usr/sbin/nologin "$KL_PGUSER"
  fi
}

kl_free_port() {
  local p=${KL_PORT:-54330}
  while (echo >/dev/tcp/127.0.0.1/$p) 2>/dev/null || [ -e "$KL_CLUSTER_DIR/run/.s.PGSQL.$p" ]; do p=$((p + 1)); done
  echo $p
}

# kl_cluster_start: initdb (fresh) + start; extra postgresql.conf lines in KL_EXTRA_CONF
kl_cluster_start() {
  kl_ensure_user
  kl_cluster_stop >/dev/null 2>&1 || true
  rm -rf "$KL_CLUSTER_DIR/data" "$KL_CLUSTER_DIR/run"
  mkdir -p "$KL_CLUSTER_DIR/run" "$KL_CLUSTER_DIR/log"
  rm -f "$KL_CLUSTER_DIR/log/server.log"	# a fresh cluster, a fresh log (run-tests.sh looks for crashes in it)
  chown "$KL_PGUSER" "$KL_CLUSTER_DIR" "$KL_CLUSTER_DIR/run" "$KL_CLUSTER_DIR/log" 2>/dev/null || true
  chmod 755 "$KL_CLUSTER_DIR"
  KL_PORT=$(kl_free_port)
  kl_as_user "$KL_PGBIN/initdb" -D "$KL_CLUSTER_DIR/data" -U "$KL_PGUSER" -A trust -E UTF8 --locale=C.UTF-8 \
    >"$KL_CLUSTER_DIR/log/initdb.log" 2>&1 || { cat "$KL_CLUSTER_DIR/log/initdb.log"; return 1; }
  {
    echo "port = $KL_PORT"
    echo "listen_addresses = ''"
    echo "unix_socket_directories = '$KL_CLUSTER_DIR/run'"
    echo "shared_preload_libraries = 'kimi_linear'"
    echo "max_connections = 60"
    echo "fsync = off"
    echo "synchronous_commit = off"
    echo "full_page_writes = off"
    echo "logging_collector = off"
    echo "log_min_messages = log"
    if [ -n "${KL_MODEL_DIR:-}" ]; then echo "kimi_linear.model_dir = '$KL_MODEL_DIR'"; fi
    if [ -n "${KL_EXTRA_CONF:-}" ]; then printf '%s\n' "$KL_EXTRA_CONF"; fi
  } | kl_as_user tee -a "$KL_CLUSTER_DIR/data/postgresql.conf" >/dev/null
  kl_as_user "$KL_PGBIN/pg_ctl" -D "$KL_CLUSTER_DIR/data" -l "$KL_CLUSTER_DIR/log/server.log" -w -t 60 start \
    >/dev/null || { tail -30 "$KL_CLUSTER_DIR/log/server.log"; return 1; }
  export PGHOST="$KL_CLUSTER_DIR/run" PGPORT="$KL_PORT" PGUSER="$KL_PGUSER" PGDATABASE=postgres
  echo "$KL_PORT" >"$KL_CLUSTER_DIR/run/port"
}

kl_cluster_stop() {
  [ -d "$KL_CLUSTER_DIR/data" ] || return 0
  kl_as_user "$KL_PGBIN/pg_ctl" -D "$KL_CLUSTER_DIR/data" -m fast -w -t 60 stop
}

# the server is up and answers
kl_cluster_alive() {
  "$KL_PGBIN/pg_isready" -q -h "$PGHOST" -p "$PGPORT" && psql -XAtqc "SELECT 1" >/dev/null 2>&1
}
