/* Besökskollen tracker (SPEC §5.4). No cookies, no storage. Configured on its script tag:
   data-site (required), data-api (another host), data-hash (count hash changes as pages),
   data-respect-dnt (send nothing when Do-Not-Track is on). */
(function (w, d) {
  var s = d.currentScript, loc = w.location, nav = w.navigator, h = w.history;
  if (!s) return;
  var site = s.getAttribute("data-site"), on = w.bkSites = w.bkSites || {};
  if (on[site]) return; // included twice: one init per site
  on[site] = 1;
  // data-api names the host (or a path ending in "/": a proxy's prefix), where /api/event is; or
  // the endpoint's whole URL, as other trackers take it (a proxy's own path, /stats/event).
  var api = new URL(s.getAttribute("data-api") || "/", s.getAttribute("data-api") ? loc : s.src).href;
  if (/\/$/.test(api)) api += "api/event";
  var hash = s.hasAttribute("data-hash");
  var off = s.hasAttribute("data-respect-dnt") && (nav.doNotTrack == "1" || w.doNotTrack == "1");
  var last = null, ref = d.referrer || null;

  // A client event id (a UUID) on every event: a retried send is counted once.
  function uuid() {
    if (w.crypto && crypto.randomUUID) return crypto.randomUUID();
    var b = crypto.getRandomValues(new Uint8Array(16)), x = "";
    b[6] = b[6] & 15 | 64; b[8] = b[8] & 63 | 128;
    for (var i = 0; i < 16; i++) x += (i == 4 || i == 6 || i == 8 || i == 10 ? "-" : "") + (b[i] + 256).toString(16).slice(1);
    return x;
  }

  // Text as the API takes it, so an event is cut rather than refused (and a conversion lost): at
  // most n characters, and no lone UTF-16 surrogate (a string cut inside an emoji), which JSON
  // parsers refuse.
  function cut(v, n) {
    return Array.from(String(v)).slice(0, n).map(function (c) { return /^[\ud800-\udfff]$/.test(c) ? "\ufffd" : c; }).join("");
  }
  // A name or product field: no control characters (a button's text has newlines), trimmed.
  function clean(v, n) {
    return cut(String(v == null ? "" : v).replace(/[\0-\x1f\x7f-\x9f]+/g, " ").trim(), n);
  }

  // A URL cut to n characters, not inside an escape nor inside a character's escapes: `%C3`
  // without its `%A5` is U+FFFD in the page, which no goal matches.
  function cutUrl(u, n) {
    var b = u.slice(0, n).replace(/%[\da-f]?$/i, ""), e = (b.match(/(%[\da-f]{2}){1,3}$/i) || [""])[0].split("%"), i = e.length, x;
    while (--i > 0 && (x = parseInt(e[i], 16)) >= 128 && x < 192);  // back over continuation bytes
    // A lead byte whose sequence (2-4 bytes) does not end within the cut goes with what follows it.
    return i > 0 && x >= 192 && e.length - i < (x >= 240 ? 4 : x >= 224 ? 3 : 2) ? b.slice(0, b.length - 3 * (e.length - i)) : b;
  }

  // The page's URL, at most the API's 2,000 characters: the fragment only when it is part of the
  // page; past the limit, of the query string only what names a source (utm tags, ad click ids).
  function href() {
    var u = loc.href.split("#")[0] + (hash ? loc.hash : ""), q = new URLSearchParams();
    if (u.length <= 2000) return u;
    new URLSearchParams(loc.search).forEach(function (v, k) { if (/^(utm_|[gdw]clid$|[gw]braid$|msclkid$)/.test(k)) q.append(k, v); });
    return cutUrl(loc.origin + loc.pathname + (q + "" ? "?" + q : "") + (hash ? loc.hash : ""), 2000);
  }

  // text/plain needs no CORS preflight, and is what sendBeacon sends. The retry goes without
  // keepalive: the browser's 64 KB budget for those (a burst of large events) may be what failed.
  function post(body, tries) {
    fetch(api, { method: "POST", body: body, keepalive: !!tries, headers: { "Content-Type": "text/plain" } })
      .then(function (r) { if (r.status >= 500 && tries) retry(body); }, function () { if (tries) retry(body); });
  }
  function retry(body) { setTimeout(function () { post(body, 0); }, 1000); }

  function send(name, extra, beacon) {
    if (off || !site) return;
    // Prerendered (ingest drops its requests as prefetch): sent once shown.
    if (d.prerendering) return d.addEventListener("prerenderingchange", function () { send(name, extra, beacon); });
    var e = { site_id: site, name: clean(name, 120), url: href(), referrer: ref, event_id: uuid() }, k, body;
    if (!e.name) return; // bk("") names nothing a goal could count
    if (hash) e.hash = true;
    for (k in extra) e[k] = extra[k];
    // Within the API's body limit (BK_MAX_EVENT_BYTES, 16 KiB by default): props go, the last first.
    var p = e.props || {}, keys = Object.keys(p);
    while (new Blob([body = JSON.stringify(e)]).size > 16e3 && keys.length) delete p[keys.pop()];
    if (!(beacon && nav.sendBeacon && nav.sendBeacon(api, body))) post(body, 1);
  }

  function page() {
    // The page as the API keeps it: the path, and with data-hash the fragment. A replaceState to
    // the same page (one that only drops utm tags), a new query string, a hash change: no new page.
    // Compared decoded, as the API keeps it: /s%c3%b6k and /s%C3%B6k are one page, and bytes that
    // are no UTF-8 are U+FFFD there as here (/a%ff and /a%fe are one page).
    var at = (loc.pathname + (hash ? loc.hash : "")).replace(/(%[\da-f]{2})+/gi, function (x) {
      return new TextDecoder().decode(new Uint8Array(x.slice(1).split("%").map(function (b) { return parseInt(b, 16); })));
    });
    if (at == last) return;
    // The document referrer goes with the landing page's events (one sent beside the pageview may
    // arrive first and open the session), not with later pages.
    if (last != null) ref = null;
    last = at;
    send("pageview");
  }

  // bk() never throws into the page's code: a prop JSON cannot write (a cyclic object, a BigInt
  // inside one) is left out, and the event goes. `click` is the affiliate links' event, which the
  // API refuses without their product: bk("click") sends nothing, and says so.
  function bk(name, options) {
    var props = options && options.props, p = {}, n = 0, k, v;
    if (clean(name, 9) == "click") return console.warn("bk: clicks come from links with data-bk-product");
    // The API takes 30 props, keys of 1-120 characters and strings of <= 500.
    for (k in props) {
      try { v = props[k]; v = v == null ? v : cut(typeof v == "object" ? JSON.stringify(v) : v, 500); } catch (x) { v = null; }
      if (v != null && k && n++ < 30) p[cut(k, 120)] = v;
    }
    send(name, props ? { props: p } : {});
  }

  function attr(c, n) {
    return clean(c.getAttribute(n), 200);
  }

  // Affiliate links (the attributes on the <a> or around it, through open shadow roots): the click
  // goes out by beacon, so the navigation away is not delayed. A double click is one click.
  function click(ev) {
    var path = ev.composedPath(), a, c, x, i, id;
    for (i = 0; i < path.length && !c; i++) {
      if (!(x = path[i]).getAttribute) continue; // a shadow root, the document
      if (!a && x.localName == "a") a = x;
      if (a && x.hasAttribute("data-bk-product")) c = x;
    }
    if (!c || !(id = attr(c, "data-bk-product")) || ev.detail > 1 || (ev.type == "auxclick" && ev.button != 1)) return;
    send("click", { product: { id: id, slug: id, category_slug: attr(c, "data-bk-category"),
      brand_slug: attr(c, "data-bk-brand"), partner_slug: attr(c, "data-bk-partner") } }, 1);
  }

  ["pushState", "replaceState"].forEach(function (m) {
    var f = h[m];
    h[m] = function () { var r = f.apply(this, arguments); page(); return r; };
  });
  w.addEventListener("popstate", page);
  if (hash) w.addEventListener("hashchange", page);
  // Routers on the Navigation API (navigation.intercept) call no history method.
  if (w.navigation) navigation.addEventListener("navigatesuccess", page);
  d.addEventListener("click", click, true);
  d.addEventListener("auxclick", click, true);
  // Back to a page in the back-forward cache: a page view, as when it loads again.
  w.addEventListener("pageshow", function (e) { if (e.persisted) { last = null; page(); } });

  // Calls made before this script loaded: window.bk = window.bk || function () { (bk.q = bk.q || []).push(arguments) }
  var queued = (w.bk && w.bk.q) || [];
  w.bk = bk;
  page();
  for (var i = 0; i < queued.length; i++) try { bk.apply(null, queued[i]); } catch (x) {} // one bad call, not the rest
})(window, document);
