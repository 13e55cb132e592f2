/* Besökskollen tracker (SPEC §5.4). No cookies, no storage. Configured on its script tag:
   data-site (required), data-api (another host), data-hash (count hash changes as pages),
   data-respect-dnt (send nothing when Do-Not-Track is on). */
(function (w, d) {
  var s = d.currentScript, loc = w.location, nav = w.navigator, h = w.history;
  if (!s) return;
  var site = s.getAttribute("data-site"), on = w.bkSites = w.bkSites || {};
  if (on[site]) return; // included twice: one init per site
  on[site] = 1;
  var api = (s.getAttribute("data-api") || new URL(s.src).origin).replace(/\/$/, "") + "/api/event";
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

  // text/plain needs no CORS preflight, and is what sendBeacon sends.
  function post(body, tries) {
    fetch(api, { method: "POST", body: body, keepalive: true, headers: { "Content-Type": "text/plain" } })
      .then(function (r) { if (r.status >= 500 && tries) retry(body); }, function () { if (tries) retry(body); });
  }
  function retry(body) { setTimeout(function () { post(body, 0); }, 1000); }

  function send(name, extra, beacon) {
    if (off || !site) return;
    // Prerendered (ingest drops its requests as prefetch): sent once shown.
    if (d.prerendering) return d.addEventListener("prerenderingchange", function () { send(name, extra, beacon); });
    var e = { site_id: site, name: name, url: loc.href, referrer: ref, event_id: uuid() }, k;
    if (hash) e.hash = true;
    for (k in extra) e[k] = extra[k];
    var body = JSON.stringify(e);
    if (!(beacon && nav.sendBeacon && nav.sendBeacon(api, body))) post(body, 1);
  }

  function page() {
    var at = loc.pathname + loc.search + (hash ? loc.hash : "");
    if (at == last) return; // replaceState to the same page, a hash change: not a new page
    // The document referrer goes with the landing page's events (one sent beside the pageview may
    // arrive first and open the session), not with later pages.
    if (last != null) ref = null;
    last = at;
    send("pageview");
  }

  function bk(name, options) {
    var props = options && options.props, p = {}, k;
    // The API takes strings of <= 500 characters.
    for (k in props) if (props[k] != null) p[k] = Array.from(String(props[k])).slice(0, 500).join("");
    send(name, props ? { props: p } : {});
  }

  // Affiliate links (the attributes on the <a> or around it): the click goes out by beacon, so the
  // navigation away is not delayed. A double click is one click.
  function click(ev) {
    var a = ev.composedPath()[0]; // in open shadow roots too
    a = a.closest && (a = a.closest("a")) && a.closest("[data-bk-product]");
    if (!a || ev.detail > 1 || (ev.type == "auxclick" && ev.button != 1)) return;
    var p = a.getAttribute("data-bk-product");
    send("click", { product: { id: p, slug: p, category_slug: a.getAttribute("data-bk-category") || "",
      brand_slug: a.getAttribute("data-bk-brand") || "", partner_slug: a.getAttribute("data-bk-partner") || "" } }, 1);
  }

  ["pushState", "replaceState"].forEach(function (m) {
    var f = h[m];
    h[m] = function () { var r = f.apply(this, arguments); page(); return r; };
  });
  w.addEventListener("popstate", page);
  if (hash) w.addEventListener("hashchange", page);
  d.addEventListener("click", click, true);
  d.addEventListener("auxclick", click, true);
  // Back to a page in the back-forward cache: a page view, as when it loads again.
  w.addEventListener("pageshow", function (e) { if (e.persisted) { last = null; page(); } });

  // Calls made before this script loaded: window.bk = window.bk || function () { (bk.q = bk.q || []).push(arguments) }
  var queued = (w.bk && w.bk.q) || [];
  w.bk = bk;
  page();
  for (var i = 0; i < queued.length; i++) bk.apply(null, queued[i]);
})(window, document);
