// A small SVG line chart: no plotting library to install. series: [{label, points: [[x, y]], color, dashed}]
"use strict";
const COLORS = ["#2f6fde", "#e0662b", "#2a9d59", "#a44bd1", "#c2185b", "#00897b", "#7a6a00", "#5d6d7e"];

function lineChart(container, series, xLabel = "optimizer step", yLabel = "loss") {
  const W = 720, H = 300, L = 56, R = 12, T = 12, B = 52;
  const all = series.flatMap(s => s.points).filter(p => Number.isFinite(p[1]));
  if (!all.length) { container.innerHTML = '<p class="help">no points yet</p>'; return; }
  let [x0, x1] = [Math.min(...all.map(p => p[0])), Math.max(...all.map(p => p[0]))];
  let [y0, y1] = [Math.min(...all.map(p => p[1])), Math.max(...all.map(p => p[1]))];
  if (x1 === x0) x1 = x0 + 1;
  if (y1 === y0) { y0 -= 0.5; y1 += 0.5; }
  const pad = (y1 - y0) * 0.05; y0 -= pad; y1 += pad;
  const sx = x => L + (x - x0) / (x1 - x0) * (W - L - R), sy = y => T + (y1 - y) / (y1 - y0) * (H - T - B);
  const parts = [];
  for (let i = 0; i <= 4; i++) {
    const y = y0 + (y1 - y0) * i / 4, x = x0 + (x1 - x0) * i / 4;
    parts.push(`<line class="grid" x1="${L}" x2="${W - R}" y1="${sy(y)}" y2="${sy(y)}"/>`,
      `<text x="${L - 6}" y="${sy(y) + 4}" text-anchor="end">${y.toPrecision(3)}</text>`,
      `<text x="${sx(x)}" y="${H - B + 16}" text-anchor="middle">${Math.round(x)}</text>`);
  }
  parts.push(`<text x="${(L + W - R) / 2}" y="${H - B + 32}" text-anchor="middle">${xLabel}</text>`,
    `<text transform="translate(14 ${(T + H - B) / 2}) rotate(-90)" text-anchor="middle">${yLabel}</text>`);
  let lx = L;
  series.forEach((s, i) => {
    const color = s.color || COLORS[i % COLORS.length];
    const pts = s.points.filter(p => Number.isFinite(p[1])).map(p => `${sx(p[0]).toFixed(1)},${sy(p[1]).toFixed(1)}`);
    if (!pts.length) return;
    parts.push(`<polyline class="series" data-label="${esc(s.label)}" stroke="${color}" ${s.dashed ? 'stroke-dasharray="5 3"' : ""} points="${pts.join(" ")}"/>`);
    if (pts.length === 1) parts.push(`<circle cx="${pts[0].split(",")[0]}" cy="${pts[0].split(",")[1]}" r="3" fill="${color}"/>`);
    parts.push(`<rect x="${lx}" y="${H - 12}" width="10" height="10" fill="${color}"/><text x="${lx + 14}" y="${H - 3}">${esc(s.label)}</text>`);
    lx += 24 + 7 * s.label.length;
  });
  container.innerHTML = `<svg class="chart" viewBox="0 0 ${W} ${H}" preserveAspectRatio="xMidYMid meet">${parts.join("")}</svg>`;
}

function esc(text) {
  return String(text).replace(/[&<>"']/g, c => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c]));
}
