{{/* The chart name, overridable. */}}
{{- define "mailauth-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The release's full name. Every object is named after it, cluster-scoped ones
(ClusterRole, ClusterRoleBinding) included, so two releases never collide.
*/}}
{{- define "mailauth-operator.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "mailauth-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels that select the controller pods; never change them on upgrade. */}}
{{- define "mailauth-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "mailauth-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: controller
{{- end }}

{{- define "mailauth-operator.labels" -}}
helm.sh/chart: {{ include "mailauth-operator.chart" . }}
{{ include "mailauth-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: mailauth-operator
{{- end }}

{{- define "mailauth-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "mailauth-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "mailauth-operator.image" -}}
{{- $repository := required "image.repository is required: no mailauth-operator image is published; build it (make image, or docker build), push it to your registry, and set image.repository (and image.tag)" .Values.image.repository }}
{{- printf "%s:%s" $repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* The image relays run unless a MailRelay names its own: by default the operator's. */}}
{{- define "mailauth-operator.relayImage" -}}
{{- $repository := default .Values.image.repository .Values.relay.image.repository }}
{{- $tag := default (default .Chart.AppVersion .Values.image.tag) .Values.relay.image.tag }}
{{- printf "%s:%s" $repository $tag }}
{{- end }}

{{- define "mailauth-operator.leaseName" -}}
{{- default (include "mailauth-operator.fullname" .) .Values.leaderElection.leaseName }}
{{- end }}
