//! Lua scripts that must be atomic on the server.
//!
//! Redelivery state lives in Redis, never only in a process: the pending
//! entries list (PEL) of the consumer group holds every unsettled entry with
//! its delivery counter, and the per-group sorted set
//! `<prefix><topic>:delayed:<group>` holds "not before" times of nacked
//! entries (score: server time in ms). Times come from the server's `TIME`
//! so clocks of clients never matter.

/// Claim what is due for `consumer`: delayed nacks whose time has come
/// (whoever holds them); if there are none, one entry idle past the ack
/// deadline that is not parked by a delayed nack (its holder vanished: it
/// comes back alone, so a crash is charged to the entry that caused it).
/// Returns `[[id, fields, count, recovered], ...]`, `count` being the
/// delivery counter after this claim (the attempt), `recovered` 1 for the
/// idle entry.
///
/// KEYS: stream, delayed zset. ARGV: group, consumer, min idle ms, count.
pub(crate) const CLAIM: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local group, me, min_idle, want = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local out, n = {}, 0
local function take(id, count, idle, recovered)
  local c = redis.call('XCLAIM', KEYS[1], group, me, idle, id)
  if c[1] and c[1][2] then
    n = n + 1
    out[n] = {c[1][1], c[1][2], count + 1, recovered}
  elseif c[1] then
    -- trimmed away while pending: nothing left to deliver
    redis.call('XACK', KEYS[1], group, id)
  end
end
local due = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, want)
for _, id in ipairs(due) do
  redis.call('ZREM', KEYS[2], id)
  local p = redis.call('XPENDING', KEYS[1], group, id, id, 1)
  if p[1] then take(id, p[1][4], 0, 0) end
end
if n == 0 then
  local parked = redis.call('ZCARD', KEYS[2])
  local pend = redis.call('XPENDING', KEYS[1], group, 'IDLE', min_idle, '-', '+', 1 + parked)
  for _, p in ipairs(pend) do
    if n >= 1 then break end
    if not redis.call('ZSCORE', KEYS[2], p[1]) then take(p[1], p[4], min_idle, 1) end
  end
end
return out
"#;

/// Nack of an entry held by `consumer`: park it until `now + delay`, when a
/// claim pass of any consumer of the group hands it out again. Returns 1,
/// or 0 when the entry is no longer pending for this consumer (it was
/// claimed by another one after the ack deadline, or settled).
///
/// KEYS: stream, delayed zset. ARGV: group, consumer, id, delay ms.
pub(crate) const NACK: &str = r#"
local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1)
if not p[1] or p[1][2] ~= ARGV[2] then return 0 end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[4]), ARGV[3])
return 1
"#;

/// Immediate nack of an entry held by `consumer`: claim it again for the
/// same consumer (the delivery counter goes up by one) and return
/// `[[id, fields, count]]`; `[]` when the entry was trimmed away, `0` when
/// it is no longer pending for this consumer.
///
/// KEYS: stream, delayed zset. ARGV: group, consumer, id (and an unused
/// delay, so it takes the arguments of [`NACK`]).
pub(crate) const RENEW: &str = r#"
local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1)
if not p[1] or p[1][2] ~= ARGV[2] then return 0 end
redis.call('ZREM', KEYS[2], ARGV[3])
local c = redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[3])
if c[1] and c[1][2] then return {{c[1][1], c[1][2], p[1][4] + 1}} end
if c[1] then redis.call('XACK', KEYS[1], ARGV[1], ARGV[3]) end
return {}
"#;

/// Give back entries this consumer read but never handed out (its stream
/// was dropped or the transport closed while a read was in flight): undo
/// the read's count (`RETRYCOUNT count - 1`) and make them due at once, so
/// the next claim pass of any consumer of the group delivers them with the
/// attempt they would have had.
///
/// KEYS: stream, delayed zset. ARGV: group, consumer, id...
pub(crate) const RELEASE: &str = r#"
for i = 3, #ARGV do
  local id = ARGV[i]
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], id, id, 1)
  if p[1] and p[1][2] == ARGV[2] then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, id, 'RETRYCOUNT', math.max(p[1][4] - 1, 0), 'JUSTID')
    redis.call('ZADD', KEYS[2], 0, id)
  end
end
return 1
"#;

/// Refresh the idle time of entries `consumer` holds (buffered by the
/// engine, or handed out), so that no claim pass takes them while they are
/// held: `XCLAIM ... JUSTID` resets the idle time without counting a
/// delivery. Returns one 1 or 0 per id: 0 when the entry is no longer
/// pending for this consumer.
///
/// KEYS: stream. ARGV: group, consumer, id...
pub(crate) const EXTEND: &str = r#"
local out = {}
for i = 3, #ARGV do
  local id = ARGV[i]
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], id, id, 1)
  if p[1] and p[1][2] == ARGV[2] then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, id, 'JUSTID')
    out[#out + 1] = 1
  else
    out[#out + 1] = 0
  end
end
return out
"#;

/// Key-ordered subscriptions keep, per group and key, the queue
/// `<prefix><topic>:korder:<group>:<key>`: a sorted set of the group's
/// pending entry ids of that key in stream order (ids zero-padded, so
/// lexical order is stream order). Only the queue's head may be handed out;
/// an entry leaves its queue when it is acked or dead-lettered, or, found
/// at the head but no longer pending (trimmed, or settled by a client that
/// knows no queues), when the next one is looked at.
macro_rules! pad_lua {
    () => {
        r#"
local function pad(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  return string.rep('0', 20 - #ms) .. ms .. '-' .. string.rep('0', 20 - #seq) .. seq
end
local function unpad(m)
  local ms, seq = string.match(m, '^0*(%d+)-0*(%d+)$')
  return ms .. '-' .. seq
end
"#
    };
}

/// Key-ordered read: `XREADGROUP ... >` for `consumer` and every keyed entry
/// read into its key's queue, in one step (no other consumer can see a
/// later entry of the key as its head while an earlier one is being read).
/// Returns `{entries, last}`; when nothing was read `last` is the id of
/// the stream's last entry (the caller blocks for entries after it).
///
/// KEYS: stream. ARGV: group, consumer, count, queue prefix, key field.
pub(crate) const KREAD: &str = concat!(
    pad_lua!(),
    r#"
local r = redis.call('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', ARGV[3], 'STREAMS', KEYS[1], '>')
if not r then
  local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
  if last[1] then return {{}, last[1][1]} end
  return {{}, '0-0'}
end
local entries = r[1][2]
for _, e in ipairs(entries) do
  local f = e[2]
  for i = 1, #f, 2 do
    if f[i] == ARGV[5] then
      redis.call('ZADD', ARGV[4] .. f[i + 1], 0, pad(e[1]))
      break
    end
  end
end
return {entries, ''}
"#
);

/// Key-ordered hand-out check of entries `consumer` holds: for each, 1 when
/// it is the head of its key's queue (it may go), 0 when an earlier entry
/// of its key is still pending in the group (it waits; its idle time is
/// refreshed so no claim pass takes it meanwhile), -1 when it is no longer
/// pending for this consumer.
///
/// KEYS: stream. ARGV: group, consumer, queue prefix, then key, id pairs.
pub(crate) const KHEADS: &str = concat!(
    pad_lua!(),
    r#"
local out = {}
for i = 4, #ARGV, 2 do
  local q, id = ARGV[3] .. ARGV[i], ARGV[i + 1]
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], id, id, 1)
  if not p[1] or p[1][2] ~= ARGV[2] then
    out[#out + 1] = -1
  else
    local me = pad(id)
    redis.call('ZADD', q, 'NX', 0, me)
    local state = 0
    while true do
      local h = redis.call('ZRANGE', q, 0, 0)[1]
      if h == me then
        state = 1
        break
      end
      local hid = unpad(h)
      if redis.call('XPENDING', KEYS[1], ARGV[1], hid, hid, 1)[1] then break end
      redis.call('ZREM', q, h)
    end
    if state == 0 then redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, id, 'JUSTID') end
    out[#out + 1] = state
  end
end
return out
"#
);

/// Key-ordered settlement: the entry leaves its key's queue (after `XACK`
/// when `ack` is 1; a dead letter is acked in its own transaction).
///
/// KEYS: stream. ARGV: group, queue, id, ack.
pub(crate) const KDONE: &str = concat!(
    pad_lua!(),
    r#"
if ARGV[4] == '1' then redis.call('XACK', KEYS[1], ARGV[1], ARGV[3]) end
redis.call('ZREM', ARGV[2], pad(ARGV[3]))
return 1
"#
);

/// How many entries follow id `ARGV[1]`, counted up to `ARGV[2]`, 100 at
/// a time (a group's lag where Redis cannot tell it: a group created at an
/// arbitrary id, entries deleted from the middle). Bounded, so the server
/// is held for at most a few milliseconds.
///
/// KEYS: stream. ARGV: id, cap.
pub(crate) const COUNT_AFTER: &str = r#"
local from, cap, n = '(' .. ARGV[1], tonumber(ARGV[2]), 0
while n < cap do
  local batch = redis.call('XRANGE', KEYS[1], from, '+', 'COUNT', math.min(100, cap - n))
  if #batch == 0 then break end
  n = n + #batch
  from = '(' .. batch[#batch][1]
end
return n
"#;
