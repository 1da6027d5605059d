/* Chorus viewer: live comments over WebSocket (subprotocol chorus.json.v1). No frameworks.
 *
 * Two views in one page: the stream picker at / and the viewer at /streams/{id} (the older
 * /?stream={id} works too). The viewer renders every server event of the wire protocol:
 * welcome, batch, ack, error, delete, pin, unpin, reactions, viewers, mode, throttle,
 * skipped, resumed, restore. It keeps the newest (epoch, offset) it saw and sends `resume`
 * with it after a reconnect or a `skipped`, and drops comments it already has by id.
 *
 * Text from the network (comments, names) only ever goes through textContent, inside elements
 * with dir="auto" that isolate it (<bdi>, or unicode-bidi: isolate in the CSS), so a bidi
 * override in one comment cannot reorder the rest of its line.
 */
(function () {
  "use strict";

  var MAX_LEN = 500;          // characters (code points) per comment
  var MAX_DOM = 500;          // comments kept in the list
  var MAX_HELD = 2000;        // comments held while paused (the oldest go first past it)
  var MAX_SEEN = 5000;        // ids remembered for de-duplication
  var BACKOFF_MAX_MS = 15000;
  var CONFIRM_TRIES = 4;      // reposts of an `unconfirmed` comment (same nonce) before giving up
  var STREAM_ID = /^[A-Za-z0-9_.:\-]{1,64}$/;
  var LS_TOKEN = "chorus.token", LS_NAME = "chorus.name", LS_UID = "chorus.uid";
  // Glyphs for the reaction names the server is configured with; an unknown name shows as text.
  var GLYPHS = {
    heart: "\u2764\uFE0F", fire: "\uD83D\uDD25", laugh: "\uD83D\uDE02", wow: "\uD83D\uDE2E",
    clap: "\uD83D\uDC4F", sad: "\uD83D\uDE22", thumbsup: "\uD83D\uDC4D", party: "\uD83C\uDF89",
    hundred: "\uD83D\uDCAF", eyes: "\uD83D\uDC40", rocket: "\uD83D\uDE80", gg: "GG"
  };

  var $ = function (id) { return document.getElementById(id); };

  function store(key, val) {   // localStorage may throw (private mode): then nothing is remembered
    try { if (val) localStorage.setItem(key, val); else localStorage.removeItem(key); } catch (e) { /* ignore */ }
  }
  function load(key) { try { return localStorage.getItem(key) || ""; } catch (e) { return ""; } }

  var fmt = (function () {
    try {
      var compact = new Intl.NumberFormat(undefined, { notation: "compact", maximumFractionDigits: 1 });
      return function (n) { return n < 10000 ? Number(n).toLocaleString() : compact.format(n); };
    } catch (e) { return function (n) { return String(n); }; }
  })();

  function waitText(ms) {
    var s = Math.ceil(ms / 1000);
    if (s < 90) return s + " s";
    var m = Math.ceil(s / 60);
    return m < 90 ? m + " min" : Math.ceil(m / 60) + " h";
  }

  /* ---------- which view ---------- */
  function streamFromLocation() {
    var m = location.pathname.match(/^\/streams\/([^\/]+)\/?$/);
    if (m) { try { return decodeURIComponent(m[1]); } catch (e) { return ""; } }
    return new URLSearchParams(location.search).get("stream") || "";
  }

  var stream = streamFromLocation();
  if (stream) viewer(stream); else picker();

  /* ================= the stream picker ================= */
  function picker() {
    $("picker").hidden = false;
    document.title = "Chorus — pick a stream";
    var list = $("live-streams"), empty = $("live-empty"), err = $("picker-error");
    $("picker-form").addEventListener("submit", function (ev) {
      ev.preventDefault();
      var id = $("picker-input").value.trim();
      if (!STREAM_ID.test(id)) {
        err.textContent = "A stream id is 1-64 letters, digits or _ . : -";
        return;
      }
      location.href = "/streams/" + encodeURIComponent(id);
    });
    function refresh() {
      fetch("/streams", { headers: { Accept: "application/json" } })
        .then(function (res) { if (!res.ok) throw new Error("HTTP " + res.status); return res.json(); })
        .then(function (data) {
          list.textContent = "";
          (data.streams || []).forEach(function (s) {
            var li = document.createElement("li");
            var a = document.createElement("a");
            a.href = "/streams/" + encodeURIComponent(s.id);
            a.className = "live-stream";
            var name = document.createElement("span");
            name.className = "live-name";
            name.textContent = s.id;
            var count = document.createElement("span");
            count.className = "viewers";
            count.textContent = fmt(s.viewers) + " watching";
            a.appendChild(name); a.appendChild(count); li.appendChild(a); list.appendChild(li);
          });
          empty.hidden = list.childElementCount > 0;
          err.textContent = "";
        })
        .catch(function () { err.textContent = "Cannot reach the gateway to list streams; retrying…"; });
    }
    if (location.protocol === "http:" || location.protocol === "https:") {
      refresh();
      setInterval(refresh, 5000);
    }
  }

  /* ================= the viewer ================= */
  function viewer(streamId) {
    var el = {
      list: $("comments"), empty: $("empty"), pill: $("new-pill"), status: $("status"),
      viewers: $("viewer-count"), pin: $("pin"), banner: $("banner"), notice: $("notice"),
      reactions: $("reactions"), pause: $("pause"), held: $("held-count"), streamName: $("stream-name"),
      input: $("comment-input"), send: $("send"), counter: $("counter"), error: $("error"),
      form: $("comment-form"), loginForm: $("login-form"), nameInput: $("name-input"), login: $("login"),
      tokenBox: $("token-box"), tokenForm: $("token-form"), tokenInput: $("token-input"),
      signedIn: $("signed-in"), meName: $("me-name"), logout: $("logout")
    };
    var state = {
      ws: null, live: false, attempt: 0, timer: null, stopped: false,
      epoch: null, offset: null, seen: new Set(), unseen: 0, stick: true,
      pending: null, nonceSeq: 0, slow: 0, keepRatio: 1, skipped: 0,
      paused: false, held: [], totals: {}, bumps: {}, me: null, noticeTimer: null,
      wait: null,        // a refusal's countdown: {until, text(ms), blocks, timer}
      resumeWhy: null,   // while a resume is answered: "reconnect", "again" (on purpose) or "skipped"
      dropped: false     // the connection was lost (not closed on purpose, as a sign-in does)
    };
    $("viewer").hidden = false;
    el.streamName.textContent = "#" + streamId;
    document.title = "#" + streamId + " — Chorus";

    /* ---------- connection ---------- */
    function setStatus(kind, text) { el.status.dataset.state = kind; el.status.textContent = text; }

    function wsUrl() {
      var proto = location.protocol === "https:" ? "wss:" : "ws:";
      var token = load(LS_TOKEN);  // anonymous viewers connect without one (read-only)
      return proto + "//" + location.host + "/ws?stream=" + encodeURIComponent(streamId) +
        (token ? "&access_token=" + encodeURIComponent(token) : "");
    }

    function send(obj) {
      if (!state.ws || state.ws.readyState !== 1) return false;
      state.ws.send(JSON.stringify(obj));
      return true;
    }

    function connect() {
      clearTimeout(state.timer);
      if (location.protocol !== "http:" && location.protocol !== "https:") {
        setStatus("offline", "offline: open via the gateway");
        return;
      }
      if (!STREAM_ID.test(streamId)) {
        setStatus("offline", "bad stream id");
        showError("A stream id is 1-64 letters, digits or _ . : -");
        return;
      }
      setStatus(state.attempt ? "reconnecting" : "connecting", state.attempt ? "reconnecting…" : "connecting…");
      var ws;
      try { ws = new WebSocket(wsUrl(), ["chorus.json.v1"]); } catch (e) {
        setStatus("offline", "offline: " + e.message);
        return;
      }
      state.ws = ws;
      ws.onopen = function () {
        if (ws !== state.ws) return;
        resume(state.dropped ? "reconnect" : "again");
      };
      ws.onmessage = function (ev) {
        if (ws !== state.ws) return;
        var msg;
        try { msg = JSON.parse(ev.data); } catch (e) { return; }
        if (msg && typeof msg.t === "string" && handlers.hasOwnProperty(msg.t)) handlers[msg.t](msg);
      };
      ws.onclose = function (ev) { if (ws === state.ws) onClosed(ev); };
    }

    // Ask for what was missed since the newest position seen (no position yet: nothing to ask).
    function resume(why) {
      if (state.epoch != null && state.offset != null && state.offset >= 0) {
        if (send({ t: "resume", epoch: state.epoch, offset: state.offset })) state.resumeWhy = why;
      }
    }

    function onClosed(ev) {
      state.ws = null;
      state.live = false;
      state.dropped = true;
      state.resumeWhy = null;
      // An unacknowledged post may be lost (its text is still in the box); one being confirmed
      // is posted again with its nonce once reconnected.
      if (state.pending && !state.pending.confirming) state.pending = null;
      updateSend();
      if (ev.code === 4401) {   // the token expired while connected: carry on reading, signed out
        signedOut("Your sign-in expired: sign in again to post.");
      } else if (ev.code >= 4500 && ev.code <= 4999) {
        state.stopped = true;
        var why = ev.code === 4503 ? "you are banned from this stream" : (ev.reason || "closed by the server");
        setStatus("offline", "disconnected: " + why);
        showError(ev.code === 4503 ? "You are banned from this chat." : "Disconnected: " + why + ".");
        return;
      }
      if (!state.stopped) scheduleReconnect(ev.code === 4401 ? 0 : null);
    }

    function scheduleReconnect(delayMs) {
      var delay = delayMs != null ? delayMs : Math.min(1000 * Math.pow(2, state.attempt), BACKOFF_MAX_MS);
      delay = Math.round(delay * (0.8 + Math.random() * 0.4));   // spread a crowd's reconnects
      state.attempt++;
      setStatus("reconnecting", "reconnecting in " + Math.max(1, Math.round(delay / 1000)) + " s");
      state.timer = setTimeout(connect, delay);
    }

    function reconnectNow() {
      var old = state.ws;
      state.ws = null;
      state.stopped = false;
      state.attempt = 0;
      if (old) old.close(1000, "reconnect");
      connect();
    }

    // The newest position seen, for `resume`: recovered batches can arrive after newer live ones.
    function track(m) {
      if (m.epoch == null || m.offset == null || m.epoch === "") return;
      if (m.epoch !== state.epoch || state.offset == null || m.offset > state.offset) {
        state.epoch = m.epoch;
        state.offset = m.offset;
      }
    }

    /* ---------- server messages ---------- */
    var handlers = {
      welcome: function (m) {
        state.live = true;
        state.attempt = 0;
        state.me = m.user || null;
        setStatus("live", "live");
        track(m);
        renderPin(m.pin || null);
        if (m.viewers) handlers.viewers(m.viewers);
        if (m.mode) handlers.mode(m.mode);
        if (typeof m.keep_ratio === "number") handlers.throttle({ keep_ratio: m.keep_ratio });
        if (m.reactions) handlers.reactions({ totals: m.reactions });
        addComments(m.recent || []);
        markMine();   // signed in (or out) since these were shown
        // Reconnected with no position to resume from (nothing had been posted): nothing was missed.
        if (state.dropped && state.resumeWhy == null) notice("Reconnected.");
        state.dropped = false;
        if (state.pending && state.pending.confirming) repost();   // reconnected while confirming
        updateSend();
      },
      batch: function (m) { track(m); addComments(m.comments || []); },
      ack: function (m) {
        if (state.pending && m.nonce === state.pending.nonce) confirmed(String(m.id));
      },
      error: function (m) {
        var mine = state.pending && m.nonce != null && m.nonce === state.pending.nonce;
        if (mine && m.code === "unconfirmed") { unconfirmed(m); return; }
        if (mine) {
          clearTimeout(state.pending.timer);
          state.pending = null;   // the text stays in the box so it can be sent again
        }
        if (m.code === "token_expired") signedOut(errorText(m));
        else if (m.retry_after_ms > 0 && WAITS.hasOwnProperty(m.code)) showWait(m, mine);
        else showError(errorText(m));
        updateSend();
      },
      "delete": function (m) {
        var id = String(m.id);
        var li = findComment(id);
        if (li && !li.classList.contains("deleted")) {
          li.classList.add("deleted");
          var own = li.comment && isMine(li.comment) && (m.code === "moderated" || m.code === "moderator");
          li.querySelector(".text").textContent = own ?
            "Your comment was removed" + (m.reason ? ": " + m.reason : ".") : "This comment was removed.";
        }
        state.held = state.held.filter(function (c) { return String(c.id) !== id; });
        renderHeld();
        if (el.pin.dataset.id === id) renderPin(null);
      },
      restore: function (m) {   // a delete undone: back in place, or in order by id
        var c = m.comment;
        if (!c || c.id == null) return;
        var id = String(c.id);
        var li = findComment(id);
        state.seen.add(id);
        if (li) el.list.replaceChild(renderComment(c), li);
        else insertInOrder(renderComment(c));
        updateEmpty();
      },
      pin: function (m) { renderPin(m.comment || null); },
      unpin: function () { renderPin(null); },
      viewers: function (m) {
        if (typeof m.now !== "number") return;
        el.viewers.hidden = false;
        el.viewers.textContent = fmt(m.now) + " watching";
        el.viewers.title = typeof m.unique === "number" ? fmt(m.unique) + " unique viewers" : "";
      },
      mode: function (m) { state.slow = Number(m.slow_mode_seconds) || 0; renderBanner(); },
      throttle: function (m) {
        var r = Number(m.keep_ratio);
        state.keepRatio = r > 0 && r < 1 ? r : 1;
        if (state.keepRatio === 1) state.skipped = 0;
        renderBanner();
      },
      skipped: function (m) {
        var n = Number(m.count) || 0;
        state.skipped += n;
        notice(fmt(n) + " comments were skipped while your connection caught up; fetching them…");
        resume("skipped");
      },
      resumed: function (m) {
        var why = state.resumeWhy;
        state.resumeWhy = null;
        if (m.recovered === false) {
          notice(why === "reconnect" ?
            "Reconnected, but some comments you missed could not be recovered: showing the latest instead." :
            "Some comments could not be recovered: showing the latest instead.");
          loadLatest();
        } else if (why === "reconnect") {
          notice("Reconnected: the comments you missed were recovered.");
        } else if (why === "skipped") {
          notice("Caught up: the skipped comments are shown.");
        }
      },
      reactions: function (m) {
        state.totals = m.totals || {};
        state.bumps = {};
        renderReactions();
      }
    };

    // Refusals that say how long to wait: their message counts down and goes when the wait is over.
    var WAITS = {
      rate_limited: function (m, left) {
        return "Slow down: " + (m.reason || "you are sending too fast") + ". Try again in " + waitText(left) + ".";
      },
      slow_mode: function (m, left) { return "Slow mode is on: you can post again in " + waitText(left) + "."; },
      timed_out: function (m, left) { return "You are timed out: you can post again in " + waitText(left) + "."; }
    };

    function errorText(m) {
      var wait = m.retry_after_ms ? waitText(m.retry_after_ms) : "";
      switch (m.code) {
        case "rate_limited":
          return "Slow down: " + (m.reason || "you are sending too fast") + "." + (wait ? " Try again in " + wait + "." : "");
        case "slow_mode":
          return "Slow mode is on: you can post again in " + (wait || "a moment") + ".";
        case "banned": return "You are banned from this chat and cannot post.";
        case "timed_out": return "You are timed out: you can post again in " + (wait || "a while") + ".";
        case "overloaded":
          return "The chat is very busy: your comment was not posted." + (wait ? " Try again in " + wait + "." : "");
        case "not_accepted": return "Your comment was not posted (the service is unavailable). Try again.";
        case "unconfirmed": return "Your comment could not be confirmed; it may still appear. Check before sending it again.";
        case "unauthorized": return "Sign in to take part: " + (m.reason || "a token is needed") + ".";
        case "token_expired": return "Your sign-in expired: sign in again to post.";
        case "missing_scope":
          return "Your sign-in does not allow posting (it needs the write:comments scope): sign in again.";
        case "bad_text":
          return "Your comment has characters that cannot be shown" + (m.reason ? " (" + m.reason + ")" : "") +
            ": remove them and send it again.";
        default: return m.reason || m.code || "Something went wrong.";
      }
    }

    function cssEscape(s) { return window.CSS && CSS.escape ? CSS.escape(s) : s.replace(/["\\]/g, "\\$&"); }

    function findComment(id) { return el.list.querySelector('li.comment[data-id="' + cssEscape(id) + '"]'); }

    // Ids are decimal strings of up to 64 bits: compare by length, then digit by digit.
    function idBefore(a, b) { return a.length !== b.length ? a.length < b.length : a < b; }

    // A comment older than some on the page (a restore, history after a failed recovery) goes
    // where its id puts it.
    function insertInOrder(li) {
      var id = li.dataset.id;
      var after = el.list.lastElementChild;
      while (after && !idBefore(after.dataset.id, id)) after = after.previousElementSibling;
      el.list.insertBefore(li, after ? after.nextElementSibling : el.list.firstElementChild);
      if (state.stick) scrollToBottom();
    }

    // After recovered:false: the newest page of history, merged in by id.
    function loadLatest() {
      fetch("/streams/" + encodeURIComponent(streamId) + "/comments?limit=50", { headers: { Accept: "application/json" } })
        .then(function (res) { if (!res.ok) throw new Error("HTTP " + res.status); return res.json(); })
        .then(function (data) {
          var list = (data.comments || []).slice().reverse();   // the answer is newest first
          var last = el.list.lastElementChild;
          list.forEach(function (c) {
            if (!c || c.id == null || state.seen.has(String(c.id))) return;
            if (last && idBefore(String(c.id), last.dataset.id)) {
              state.seen.add(String(c.id));
              insertInOrder(renderComment(c));
            } else {
              addComments([c]);
            }
          });
          updateEmpty();
        })
        .catch(function () { notice("Some comments could not be recovered; reload the page to see them."); });
    }

    /* ---------- rendering ---------- */
    function atBottom() { return el.list.scrollHeight - el.list.scrollTop - el.list.clientHeight < 48; }

    function authorBlock(c, cls) {
      var frag = document.createDocumentFragment();
      var user = c.user || {};
      var name = document.createElement("bdi");   // isolated: a name's bidi controls stay inside it
      name.className = cls;
      name.dir = "auto";
      name.textContent = user.name || "anonymous";
      frag.appendChild(name);
      (Array.isArray(user.badges) ? user.badges : []).forEach(function (b) {
        var t = b && typeof b === "object" ? String(b.label || b.name || b.id || "") : String(b == null ? "" : b);
        if (!t) return;
        var chip = document.createElement("span");
        chip.className = "badge badge-" + t.toLowerCase().replace(/[^a-z0-9_-]/g, "");
        chip.textContent = t;
        frag.appendChild(chip);
      });
      return frag;
    }

    function isMine(c) {
      var uid = c.user && c.user.id != null ? String(c.user.id) : null;
      if (uid == null) return false;
      return (state.me && String(state.me.id) === uid) || uid === load(LS_UID);
    }

    function markMine() {
      Array.prototype.forEach.call(el.list.children, function (li) {
        li.classList.toggle("mine", !!li.comment && isMine(li.comment));
      });
    }

    function renderComment(c) {
      var li = document.createElement("li");
      li.className = "comment";
      li.dataset.id = String(c.id);
      li.comment = c;   // for a delete (whose it was) and a restore
      if (isMine(c)) li.classList.add("mine");
      var meta = document.createElement("div");
      meta.className = "meta";
      meta.appendChild(authorBlock(c, "author"));
      var d = new Date(Number(c.ts));
      if (c.ts != null && !isNaN(d.getTime())) {
        var time = document.createElement("time");
        time.dateTime = d.toISOString();
        time.title = d.toLocaleString();
        time.textContent = d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
        meta.appendChild(time);
      }
      var text = document.createElement("p");
      text.className = "text";
      text.dir = "auto";
      text.textContent = String(c.text == null ? "" : c.text);
      li.appendChild(meta);
      li.appendChild(text);
      return li;
    }

    // New comments, de-duplicated by id; while paused they wait in `held`, counted on the button.
    function addComments(list) {
      var fresh = [], landed = null;
      list.forEach(function (c) {
        if (!c || c.id == null) return;
        var id = String(c.id);
        if (state.pending && state.pending.unconfirmed.indexOf(id) >= 0) landed = id;   // it was posted after all
        if (state.seen.has(id)) return;
        state.seen.add(id);
        fresh.push(c);
      });
      if (landed) confirmed(landed);
      if (state.seen.size > MAX_SEEN) {
        // Sets iterate in insertion order: forget the oldest ids.
        state.seen = new Set(Array.from(state.seen).slice(-MAX_SEEN / 2));
      }
      if (!fresh.length) return;
      if (state.paused) {
        state.held = state.held.concat(fresh).slice(-MAX_HELD);
        renderHeld();
        return;
      }
      showComments(fresh);
    }

    function showComments(list) {
      var frag = document.createDocumentFragment();
      list.forEach(function (c) { frag.appendChild(renderComment(c)); });
      el.list.appendChild(frag);
      while (el.list.childElementCount > MAX_DOM) el.list.firstElementChild.remove();
      updateEmpty();
      if (state.stick) scrollToBottom();
      else { state.unseen += list.length; renderPill(); }
    }

    function setPaused(paused) {
      state.paused = paused;
      el.pause.setAttribute("aria-pressed", paused ? "true" : "false");
      el.pause.classList.toggle("paused", paused);
      el.pause.querySelector(".pause-icon").textContent = paused ? "\u25B6" : "\u275A\u275A";
      el.pause.querySelector(".pause-label").textContent = paused ? "Resume" : "Pause";
      if (!paused && state.held.length) {
        var held = state.held;
        state.held = [];
        state.stick = true;
        showComments(held);
      }
      renderHeld();
    }

    function renderHeld() {
      var n = state.held.length;
      el.held.hidden = !state.paused;
      el.held.textContent = fmt(n) + " new";
      el.pause.title = state.paused ? n + " new comments waiting; resume to show them" :
        "Hold the list still; new comments wait and are counted";
    }

    function scrollToBottom() { el.list.scrollTop = el.list.scrollHeight; state.unseen = 0; renderPill(); }

    function renderPill() {
      el.pill.hidden = state.unseen === 0;
      el.pill.textContent = state.unseen + " new ↓";
      el.pill.setAttribute("aria-label", state.unseen + " new comments, jump to newest");
    }

    function updateEmpty() { el.empty.hidden = el.list.childElementCount > 0; }

    function renderPin(c) {
      el.pin.hidden = !c;
      el.pin.dataset.id = c ? String(c.id) : "";
      var author = el.pin.querySelector(".pin-author");
      author.textContent = "";
      if (!c) { el.pin.querySelector(".pin-text").textContent = ""; return; }
      author.appendChild(authorBlock(c, "author"));
      var text = el.pin.querySelector(".pin-text");
      text.dir = "auto";
      text.textContent = String(c.text == null ? "" : c.text);
    }

    function renderBanner() {
      var parts = [];
      if (state.slow > 0) parts.push("Slow mode: one comment every " + waitText(state.slow * 1000));
      if (state.keepRatio < 1) parts.push("Busy chat: showing 1 in " + Math.round(1 / state.keepRatio) + " comments");
      el.banner.hidden = !parts.length;
      el.banner.textContent = parts.join(" · ");
    }

    function notice(text) {
      el.notice.textContent = text;
      el.notice.hidden = false;
      clearTimeout(state.noticeTimer);
      state.noticeTimer = setTimeout(function () { el.notice.hidden = true; }, 8000);
    }

    function showError(text) {
      if (state.wait) { clearTimeout(state.wait.timer); state.wait = null; }
      el.error.textContent = text;
    }

    // A refusal with retry_after_ms: the message counts down by the clock (so a reconnect or a
    // sleeping tab does not stall it) and goes when the wait is over; `blocks` holds Send till then.
    function showWait(m, blocks) {
      showError("");
      var wait = { until: Date.now() + Number(m.retry_after_ms), text: WAITS[m.code], msg: m, blocks: blocks };
      state.wait = wait;
      (function tick() {
        if (state.wait !== wait) return;
        var left = wait.until - Date.now();
        if (left <= 0) {
          state.wait = null;
          el.error.textContent = "";
          updateSend();
          return;
        }
        el.error.textContent = wait.text(wait.msg, left);
        wait.timer = setTimeout(tick, (left % 1000) || 1000);   // on the second boundaries of the wait
      })();
    }

    function signedOut(text) {
      store(LS_TOKEN, "");
      renderAccount();
      showError(text);
    }

    /* ---------- reactions ---------- */
    function renderReactions() {
      var names = Object.keys(state.totals);
      names.forEach(function (name) {
        var btn = el.reactions.querySelector('button[data-emoji="' + cssEscape(name) + '"]');
        if (!btn) {
          btn = document.createElement("button");
          btn.type = "button";
          btn.className = "reaction-btn";
          btn.dataset.emoji = name;
          var glyph = document.createElement("span");
          glyph.className = "glyph";
          glyph.textContent = GLYPHS[name] || name;
          glyph.setAttribute("aria-hidden", "true");
          var count = document.createElement("span");
          count.className = "count";
          btn.appendChild(glyph);
          btn.appendChild(count);
          btn.addEventListener("click", function () { react(name, btn); });
          el.reactions.appendChild(btn);
        }
        var n = (Number(state.totals[name]) || 0) + (state.bumps[name] || 0);
        btn.querySelector(".count").textContent = fmt(n);
        btn.setAttribute("aria-label", name + ": " + n);
      });
      el.reactions.hidden = names.length === 0;
    }

    function react(name, btn) {
      if (!load(LS_TOKEN)) { showError("Sign in to react."); return; }
      if (!send({ t: "react", emoji: name })) return;
      state.bumps[name] = (state.bumps[name] || 0) + 1;   // shown at once; the next totals replace it
      renderReactions();
      floatUp(btn);
    }

    function floatUp(btn) {
      var f = document.createElement("span");
      f.className = "float";
      f.textContent = btn.querySelector(".glyph").textContent;
      f.style.left = (btn.offsetLeft + btn.offsetWidth / 2 - 10 + (Math.random() * 16 - 8)) + "px";
      el.reactions.appendChild(f);
      setTimeout(function () { f.remove(); }, 1200);
    }

    /* ---------- composing ---------- */
    function updateSend() {
      var text = el.input.value;
      var n = Array.from(text).length;   // code points, not UTF-16 units
      var tooLong = n > MAX_LEN;
      el.counter.textContent = n + "/" + MAX_LEN;
      el.counter.classList.toggle("over", tooLong);
      el.counter.classList.toggle("near", !tooLong && n > MAX_LEN - 50);
      var token = load(LS_TOKEN);
      var waiting = !!(state.wait && state.wait.blocks);
      el.send.disabled = !token || !state.live || !!state.pending || waiting || !text.trim() || tooLong;
      el.send.textContent = state.pending ? (state.pending.confirming ? "Confirming…" : "Sending…") : "Send";
      el.input.placeholder = token ? "Say something…" : "Sign in below to comment";
    }

    function autosize() {
      el.input.style.height = "auto";
      el.input.style.height = Math.min(el.input.scrollHeight + 2, 140) + "px";
    }

    function submitComment(ev) {
      ev.preventDefault();
      if (el.send.disabled || !state.ws) return;
      var nonce = "c" + Date.now().toString(36) + "-" + (++state.nonceSeq);
      state.pending = { nonce: nonce, text: el.input.value, tries: 0, confirming: false, unconfirmed: [], timer: null };
      showError("");
      sendPending();
      updateSend();
    }

    function sendPending() {
      var p = state.pending;
      send({ t: "comment", text: p.text.trim(), nonce: p.nonce });
      // Never leave the box locked if no ack or error arrives.
      clearTimeout(p.timer);
      p.timer = setTimeout(function () {
        if (state.pending === p) { state.pending = null; updateSend(); }
      }, 10000);
    }

    function confirmed(id) {
      var p = state.pending;
      clearTimeout(p.timer);
      if (el.input.value === p.text) { el.input.value = ""; autosize(); }
      state.pending = null;
      // A repost answered with another id: the first copy (if it appears after all) is dropped.
      p.unconfirmed.forEach(function (first) {
        if (first === id) return;
        state.seen.add(first);
        var li = findComment(first);
        if (li) li.remove();
        state.held = state.held.filter(function (c) { return String(c.id) !== first; });
      });
      showError("");
      updateSend();
    }

    // The log took the comment but did not confirm it: post it again with the same nonce (the
    // gateway answers a repeated nonce with the first comment's id), a few times with backoff.
    function unconfirmed(m) {
      var p = state.pending;
      clearTimeout(p.timer);
      if (m.id != null) p.unconfirmed.push(String(m.id));
      if (p.tries >= CONFIRM_TRIES) {
        state.pending = null;
        showError(errorText(m));
        updateSend();
        return;
      }
      p.tries++;
      p.confirming = true;
      var backoff = 500 * Math.pow(2, p.tries - 1) * (0.8 + Math.random() * 0.4);
      showError("Your comment is confirming…");
      p.timer = setTimeout(repost, Math.max(Number(m.retry_after_ms) || 0, backoff));
      updateSend();
    }

    function repost() {
      var p = state.pending;
      if (!p || !p.confirming) return;
      if (!state.live) return;   // sent again by the next welcome
      sendPending();
    }

    /* ---------- account ---------- */
    function renderAccount() {
      var token = load(LS_TOKEN);
      el.signedIn.hidden = !token;
      el.loginForm.hidden = !!token;
      el.tokenBox.hidden = !!token;
      el.meName.textContent = load(LS_NAME) || "token user";
      if (!token && !el.nameInput.value) el.nameInput.value = load(LS_NAME);
      updateSend();
    }

    function signIn(token, name, uid) {
      store(LS_TOKEN, token); store(LS_NAME, name); store(LS_UID, uid);
      showError("");
      renderAccount();
      reconnectNow();
    }

    function devLogin(ev) {
      ev.preventDefault();
      var name = el.nameInput.value.trim();
      if (!name) { showError("Type a name first."); el.nameInput.focus(); return; }
      el.login.disabled = true;
      fetch("/dev/token?name=" + encodeURIComponent(name), { headers: { Accept: "application/json" } })
        .then(function (res) {
          if (res.status === 404) throw new Error("nologin");
          if (!res.ok) throw new Error("sign-in failed (HTTP " + res.status + ")");
          return res.json();
        })
        .then(function (data) {
          if (!data || !data.token) throw new Error("sign-in failed: no token returned");
          var user = data.user || {};
          signIn(data.token, user.name || name, user.id != null ? String(user.id) : "");
        })
        .catch(function (err) {
          if (err.message === "nologin") {
            showError("Posting needs a token: paste one below.");
            el.tokenBox.open = true;
            el.tokenInput.focus();
          } else {
            showError(err.message === "Failed to fetch" ? "sign-in failed: gateway unreachable" : err.message);
          }
        })
        .then(function () { el.login.disabled = false; });
    }

    /* ---------- wiring ---------- */
    el.form.addEventListener("submit", submitComment);
    el.input.addEventListener("input", function () { autosize(); updateSend(); });
    el.input.addEventListener("keydown", function (ev) {
      if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) submitComment(ev);
    });
    el.pause.addEventListener("click", function () { setPaused(!state.paused); });

    el.list.addEventListener("scroll", function () {
      state.stick = atBottom();
      if (state.unseen && state.stick) { state.unseen = 0; renderPill(); }
    });
    // Banners and the pin bar change the list's height: stay pinned to the newest comment.
    if (window.ResizeObserver) {
      new ResizeObserver(function () { if (state.stick) el.list.scrollTop = el.list.scrollHeight; }).observe(el.list);
    }
    el.pill.addEventListener("click", scrollToBottom);

    el.loginForm.addEventListener("submit", devLogin);
    el.tokenForm.addEventListener("submit", function (ev) {
      ev.preventDefault();
      var token = el.tokenInput.value.trim();
      if (!token) { showError("Paste a token first."); return; }
      el.tokenInput.value = "";
      signIn(token, el.nameInput.value.trim(), "");
    });
    el.logout.addEventListener("click", function () {
      store(LS_TOKEN, ""); store(LS_UID, "");
      renderAccount();
      reconnectNow();
    });
    // A phone that wakes up or comes back online reconnects at once instead of waiting out the backoff.
    window.addEventListener("online", function () { if (!state.ws && !state.stopped) reconnectNow(); });
    document.addEventListener("visibilitychange", function () {
      if (!document.hidden && !state.ws && !state.stopped) reconnectNow();
    });

    el.reactions.hidden = true;
    renderAccount();
    renderHeld();
    updateEmpty();
    connect();
  }
})();
