#!/usr/bin/env bash
# (From the project's shared device tools.) Run on the GPU machine (Ubuntu, no network, commands run as root).
#   bash pg-on-device.sh [RUNTIME_TARBALL] [STAGE_DIR]
# Unpacks the runtime made by make-pg-runtime.sh (default .gpu/pg-runtime.tar.xz) under /opt/pg, copies
# STAGE_DIR (default .gpu/stage, the output of `make install DESTDIR=...`) over it, creates the user `pgrun`,
# and starts a throwaway PostgreSQL 15 cluster on a Unix socket in /tmp, with any extra postgresql.conf lines
# in $PG_CONF (for example: PG_CONF="shared_preload_libraries='kimi_linear'").
# Afterwards, in the same command: . /tmp/pgenv   (sets PATH, LD_LIBRARY_PATH, PGHOST, PGUSER)
set -euo pipefail
tarball=${1:-.gpu/pg-runtime.tar.xz}
stage=${2:-.gpu/stage}
root=/opt/pg
mkdir -p $root
tar xJf "$tarball" -C $root
[ -d "$stage/usr" ] && cp -a "$stage/usr/." $root/usr/
bin=$root/usr/lib/postgresql/15/bin
libs=$root/usr/lib/x86_64-linux-gnu:$root/lib/x86_64-linux-gnu:$root/usr/lib/x86_64-linux-gnu/openblas-pthread
cat > /tmp/pgenv <<ENV
export PATH=$bin:\$PATH
export LD_LIBRARY_PATH=$libs:\${LD_LIBRARY_PATH:-}
export PGHOST=/tmp PGUSER=pgrun PGDATABASE=postgres
ENV
id pgrun >/dev/null 2>&1 || useradd -m -s /bin/bash pgrun
chmod -R a+rX $root
data=/tmp/pgdata
rm -rf $data
su pgrun -c ". /tmp/pgenv && initdb -D $data -A trust -U pgrun >/tmp/initdb.log 2>&1" || { cat /tmp/initdb.log; exit 1; }
printf '%s\n' "listen_addresses = ''" "unix_socket_directories = '/tmp'" "${PG_CONF:-}" >> $data/postgresql.conf
su pgrun -c ". /tmp/pgenv && pg_ctl -D $data -l /tmp/pg.log -w start" >/dev/null || { tail -20 /tmp/pg.log; exit 1; }
echo "postgres is up: . /tmp/pgenv; psql -c 'select 1'   (log: /tmp/pg.log)"
