-- Statements about a connection's session rather than about data.

-- name: commit_async
-- A commit returns before its WAL is flushed: safe for a batch, whose raw rows, normalized
-- rows, checkpoint and counters commit together (a commit lost in a server crash loses all
-- of them, and the next run reads them again). The pool resets it when the connection is
-- released.
SET synchronous_commit = off

-- name: ping
-- Whether the connection still reaches the server.
SELECT 1

-- name: server_version
SHOW server_version
